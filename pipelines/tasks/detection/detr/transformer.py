"""DETR's encoder-decoder transformer (post-norm). Unlike torch.nn.Transformer, the position encoding is added
to the queries and keys (never the values) of every attention in every layer, the encoder has no final
LayerNorm, and the decoder returns every layer's output through its shared final LayerNorm (for the auxiliary
losses). Tensors are batch-first here; the parameters (and their names) are those of DETR's modules.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)  # stateless: one module serves every dropout site

    def forward(self, src: Tensor, pos: Tensor, padding: Tensor) -> Tensor:
        q = k = src + pos
        attended = self.self_attn(q, k, src, key_padding_mask=padding, need_weights=False)[0]
        src = self.norm1(src + self.dropout(attended))
        return self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, padding: Tensor) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.multihead_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=padding,
                                       need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(attended))
        return self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, pos: Tensor, padding: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, padding)
        return src


class TransformerDecoder(nn.Module):
    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, padding: Tensor) -> Tensor:
        """(num_layers, B, Q, D): each layer's output after the shared final norm (the last is the output)."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, padding)
            outputs.append(self.norm(tgt))  # the un-normed tgt goes on to the next layer
        return torch.stack(outputs)


class Transformer(nn.Module):
    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers)
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout), num_decoder_layers, d_model)
        self.d_model = d_model
        for p in self.parameters():  # DETR's initialisation: Xavier-uniform on every matrix
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> Tensor:
        """src and pos (B, D, H, W), mask (B, H, W) True on padding, query_embed (Q, D) ->
        decoder outputs (num_decoder_layers, B, Q, D)."""
        batch = src.shape[0]
        src, pos = src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2)  # (B, HW, D)
        padding = mask.flatten(1)
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)
        memory = self.encoder(src, pos, padding)
        # the decoder starts from zeros: the queries enter only as positions (query_pos)
        return self.decoder(torch.zeros_like(query_pos), memory, pos, query_pos, padding)
