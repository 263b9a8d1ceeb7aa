"""The mechanism of a divergence: what the attention's pieces look like on the way to a run's first bad step.

:func:`probe_run` takes a run directory whose ``steps.jsonl`` has a bad step ``F``, retrains the run's own config
(the normal trainer; every step is a pure function of the config and the step, so the weights are the run's)
to step ``F - 1`` with checkpoints along the way, then, at each checkpoint ``s``, runs the batch of step ``s + 1``
forward and backward with every kernelized attention layer instrumented (:func:`measure`):

- ``q_norm_max`` / ``k_norm_max``: the largest ``|q|``, ``|k|`` of a head, as the feature map sees them (PRF scales
  them by ``head_dim ** -1/4``; NPRF normalises them to 1, so there it is the raw norm before that);
- ``key_exponent_max`` / ``key_exponent_min``: extremes over keys of ``max_m (w_m.k - |k|^2 / 2)``, the log of a
  key's largest feature (keys take no stabiliser; float32 ``exp`` underflows to 0 below about -103);
- ``dead_keys``: fraction of keys whose features all underflowed to 0;
- ``normaliser_min``: the smallest ``sum_{j<=i} c(i-j) phi(q_i).phi(k_j)`` over positions (float32, as the op
  computes it), and ``tiny_normalisers``: the fraction of positions where it is below 1e-30;
- ``grad_phi_q_max`` / ``grad_phi_k_max``: the largest ``|dL/dphi|`` (``inf``/``nan`` when not finite);
- per parameter: gradient norm; ``nonfinite_params``: the parameters whose gradient is not finite.

Softmax layers are not instrumented (they have no features); their parameters' gradients are still reported.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from lm.attention import KernelizedAttention
from lm.steplog import read_steps

TINY = 1e-30


def first_bad_step(run_dir: Path) -> tuple[int, str]:
    """(step, reason) of the first bad step in ``run_dir/steps.jsonl``; a ValueError when there is none."""
    for r in read_steps(Path(run_dir) / "steps.jsonl"):
        if r["bad"]:
            return r["step"], r["bad"]
    raise ValueError(f"{run_dir}/steps.jsonl has no bad step: nothing to probe")


def _finite_max(t: torch.Tensor) -> float:
    """``max |t|``; ``nan`` if any element is nan, ``inf`` if any is infinite."""
    if torch.isnan(t).any():
        return math.nan
    return t.abs().max().item() if t.numel() else 0.0


class _Recorder:
    """Wraps the ``features`` of one kernelized layer: keeps q, k (as the map sees them), the features (with
    their gradients retained) and the layer's RPE table, for :meth:`stats` after backward."""

    def __init__(self, layer: KernelizedAttention):
        self.layer = layer
        self.original = layer.features
        self.saved: dict = {}
        layer.features = self  # instance attribute: forward's self.features(x) calls this

    def __call__(self, x: torch.Tensor):
        phi_q, phi_k, v = self.original(x)
        q, k, _ = self.layer.qkv(x)
        with torch.no_grad():
            d = q.shape[-1]
            if self.layer.feature_map == "prf":
                qs, ks = q * d ** -0.25, k * d ** -0.25
                ks_map = ks
            else:  # nprf: the map normalises; report the raw norms and the exponents of the unit vectors
                qs, ks, ks_map = q, k, F.normalize(k, dim=-1)
            w = self.layer.projection.to(ks_map.dtype)
            exponent = (ks_map @ w.T - 0.5 * (ks_map * ks_map).sum(-1, keepdim=True)).amax(-1)
            self.saved.update(q_norm_max=qs.norm(dim=-1).max().item(), k_norm_max=ks.norm(dim=-1).max().item(),
                              key_exponent_max=exponent.max().item(), key_exponent_min=exponent.min().item(),
                              dead_keys=(phi_k.amax(-1) == 0).double().mean().item(),
                              phi_k_max=phi_k.max().item(), phi_q_min_of_row_max=phi_q.amax(-1).min().item())
        phi_q.retain_grad()
        phi_k.retain_grad()
        self.saved["phi"] = (phi_q, phi_k)
        return phi_q, phi_k, v

    def normaliser(self, rpe_table: Optional[torch.Tensor]) -> torch.Tensor:
        """``sum_{j<=i} c(i-j) phi_q_i . phi_k_j`` in float32 (as the op sums it), ``(B, H, N)``."""
        phi_q, phi_k = (t.detach() for t in self.saved["phi"])
        n = phi_q.shape[-2]
        i = torch.arange(n)
        offset = i[:, None] - i[None, :]
        if rpe_table is None:
            weights = (offset >= 0).to(phi_q.dtype)
        else:
            b = rpe_table.detach().to(phi_q.dtype)
            b = (b.expand(phi_q.shape[1], -1) if b.dim() == 1 else b)
            b = b - b.amax(-1, keepdim=True)
            weights = torch.where(offset >= 0, b[:, offset.clamp(0, b.shape[-1] - 1)].exp(), torch.zeros(()))
        return ((phi_q @ phi_k.transpose(-1, -2)) * weights).sum(-1)

    def stats(self, rpe_table: Optional[torch.Tensor]) -> dict:
        den = self.normaliser(rpe_table)
        phi_q, phi_k = self.saved["phi"]
        out = {k: v for k, v in self.saved.items() if k != "phi"}
        out.update(normaliser_min=den.min().item(), tiny_normalisers=(den < TINY).double().mean().item(),
                   grad_phi_q_max=_finite_max(phi_q.grad) if phi_q.grad is not None else None,
                   grad_phi_k_max=_finite_max(phi_k.grad) if phi_k.grad is not None else None)
        return out

    def remove(self) -> None:
        del self.layer.features


def measure(model: torch.nn.Module, batch: torch.Tensor) -> dict:
    """Forward + backward of ``model`` (a :class:`lm.model.Transformer`) on ``batch`` ``(B, N + 1)`` token ids
    (inputs ``[:, :-1]``, targets ``[:, 1:]``, the training loss) with every kernelized layer instrumented.
    Returns ``{"loss", "grad_norm", "nonfinite_params", "param_grad_norms", "layers": [per-layer stats]}``."""
    model.train()
    model.zero_grad(set_to_none=True)
    recorders = [_Recorder(b.attn) for b in model.blocks if isinstance(b.attn, KernelizedAttention)]
    try:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        loss.backward()
        tables = model.rpe_tables(batch.shape[1] - 1)
        layers = []
        kernelized = [i for i, b in enumerate(model.blocks) if isinstance(b.attn, KernelizedAttention)]
        for i, rec in zip(kernelized, recorders):
            layers.append({"layer": i, **rec.stats(tables[i])})
    finally:
        for rec in recorders:
            rec.remove()
    grads = {name: (p.grad.norm().item() if p.grad is not None else 0.0) for name, p in model.named_parameters()}
    total = math.sqrt(sum(g * g for g in grads.values())) if all(map(math.isfinite, grads.values())) else math.nan
    return {"loss": loss.item(), "grad_norm": total,
            "nonfinite_params": [n for n, g in grads.items() if not math.isfinite(g)],
            "param_grad_norms": grads, "layers": layers}


def probe_run(run_dir: Path, work_dir: Path, snapshots: int = 6, overrides=()) -> dict:
    """Retrain ``run_dir``'s config into ``work_dir`` up to the step before its first bad step ``F`` (about
    ``snapshots`` checkpoints on the way), then :func:`measure` each checkpoint ``s`` on the batch of step ``s + 1``.
    Returns ``{"run", "first_bad_step", "reason", "steps": [{"step": s + 1, ...measure...}]}``: the entry of step
    ``F`` is measured at the weights that produced the bad step."""
    from lm.checkpoint import list_checkpoints, load_for_inference
    from lm.config import load_stored_config
    from lm.data import global_batch, prepare_corpus
    from lm.train import train

    run_dir, work_dir = Path(run_dir), Path(work_dir)
    bad_step, reason = first_bad_step(run_dir)
    cfg = load_stored_config(run_dir / "config.yaml", overrides)
    cfg.run_dir = str(work_dir)
    cfg.stop_at = bad_step - 1
    cfg.save_every = max(1, (bad_step - 1) // snapshots)
    cfg.keep_checkpoints = snapshots + 2
    cfg.eval_every = 0
    if bad_step > 1:
        train(cfg)
    corpus = prepare_corpus(cfg.data)
    train_split = corpus.split("train")
    steps = []
    for ckpt in list_checkpoints(work_dir):
        inference = load_for_inference(ckpt)
        s = inference.step
        batch = global_batch(train_split, cfg.data.seq_len, cfg.batch_size, s, cfg.seed)
        steps.append({"step": s + 1, **measure(inference.model, batch)})
    return {"run": str(run_dir), "first_bad_step": bad_step, "reason": reason, "steps": steps}


def format_probe(result: dict) -> str:
    """A text table: one line per (step, layer)."""
    head = (f"{'step':>5} {'layer':>5} {'loss':>7} {'grad norm':>10} {'|q| max':>8} {'|k| max':>8} "
            f"{'key exp max':>11} {'key exp min':>11} {'dead keys':>9} {'normaliser min':>14} {'tiny norm.':>10} "
            f"{'|dL/dphi_k|':>11}  non-finite gradients")
    lines = [f"run {result['run']}: first bad step {result['first_bad_step']} ({result['reason']})", head,
             "-" * len(head)]
    for s in result["steps"]:
        bad = ", ".join(s["nonfinite_params"][:4]) + (" ..." if len(s["nonfinite_params"]) > 4 else "")
        for L in s["layers"] or [{}]:
            lines.append(f"{s['step']:>5} {L.get('layer', '-'):>5} {s['loss']:>7.3f} {s['grad_norm']:>10.3g} "
                         f"{L.get('q_norm_max', math.nan):>8.2f} {L.get('k_norm_max', math.nan):>8.2f} "
                         f"{L.get('key_exponent_max', math.nan):>11.1f} {L.get('key_exponent_min', math.nan):>11.1f} "
                         f"{L.get('dead_keys', math.nan):>9.4f} {L.get('normaliser_min', math.nan):>14.3e} "
                         f"{L.get('tiny_normalisers', math.nan):>10.4f} {L.get('grad_phi_k_max', math.nan) or 0:>11.3g}"
                         f"  {bad or '-'}")
    return "\n".join(lines)
