"""An independent, line-by-line transcription of the GAL step in the spec, used as the test oracle.

It is deliberately naive (no fusion, no distributed logic, recomputes everything) so that a bug in the
library's optimised step shows up as a mismatch here.
"""
import torch


def reference_step(adjuster, z, loss_fn, lr):
    """Returns dict(loss, tentative, remainder (with graph into h), accepted, g, a_hat, sent)."""
    z0 = z.detach().float().requires_grad_()
    loss = loss_fn(z0)
    (g,) = torch.autograd.grad(loss, z0)
    z0 = z0.detach()
    rows = g.reshape(-1, g.shape[-1])
    a = adjuster.net(z0) if adjuster.net is not None else None
    a_rows = a.reshape(-1, g.shape[-1])
    proposal = getattr(adjuster, "proposal", "row")
    if proposal == "batch":  # one norm over the whole batch
        a_hat = adjuster.ratio * a / a.norm() * g.norm() if a.norm() > 0 else torch.zeros_like(g)
    else:  # "row" (Eq. 4), or "bounded": the row's norm times tanh(||a_row||)
        squash = (lambda r: torch.tanh(r)) if proposal == "bounded" else (lambda r: 1.0)
        a_hat = torch.stack([
            adjuster.ratio * squash(a_row.norm()) * a_row / a_row.norm() * g_row.norm() if a_row.norm() > 0
            else torch.zeros_like(a_row)
            for a_row, g_row in zip(a_rows, rows)
        ]).reshape(g.shape) if len(rows) else torch.zeros_like(g)
    delta = lr * adjuster.scale * (g + a_hat)
    tentative = loss_fn(z0 - delta)
    directional = (delta * g).sum()
    if adjuster.remainder == "reference":
        directional = directional / max(len(rows), 1)
    elif adjuster.remainder == "mean":
        directional = directional / max(g.numel(), 1)
    remainder = (tentative - loss.detach() + directional).abs()
    accepted = {"safeguard": bool(tentative <= loss), "strict": bool(tentative < loss),
                "always": True, "never": False}[adjuster.policy]
    sent = (g + a_hat).detach() if accepted else g
    return dict(loss=loss.detach(), tentative=tentative.detach(), remainder=remainder, accepted=accepted,
                g=g, a_hat=a_hat.detach(), sent=sent)
