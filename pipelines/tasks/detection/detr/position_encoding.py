"""DETR's sine position encoding of a feature map, computed from its padding mask."""
import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding: ``num_pos_feats`` channels for y, then as many for x. With ``normalize``,
    coordinates are the cumulative count of valid (unpadded) pixels scaled so each image's last valid row
    and column reach ``scale``: every image is encoded over its own extent, whatever the batch padding."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.normalize, self.scale = normalize, scale

    def forward(self, mask: Tensor) -> Tensor:
        """mask (B, H, W), True on padding -> (B, 2 * num_pos_feats, H, W) float32."""
        valid = ~mask
        y = valid.cumsum(1, dtype=torch.float32)
        x = valid.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6  # an all-padding column/row stays finite
            y = y / (y[:, -1:, :] + eps) * self.scale
            x = x / (x[:, :, -1:] + eps) * self.scale
        # channel pairs (2i, 2i+1) share the frequency temperature^(2i / num_pos_feats): sin on even, cos on odd
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        freq = self.temperature ** (2 * (i // 2) / self.num_pos_feats)
        return torch.cat([self._sin_cos(y[..., None] / freq), self._sin_cos(x[..., None] / freq)],
                         dim=3).permute(0, 3, 1, 2)

    @staticmethod
    def _sin_cos(angles: Tensor) -> Tensor:
        # interleave sin of the even channels with cos of the odd ones: (s0, c1, s2, c3, ...)
        return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=4).flatten(3)
