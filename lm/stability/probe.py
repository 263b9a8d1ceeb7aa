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
- ``attention_error``: mean total-variation distance between each query's random-feature attention weights and
  the exact weights of the kernel they estimate (``exp(q.k / sqrt(d))`` for PRF, ``exp(q^.k^)`` of the unit
  vectors for NPRF; with the RPE), computed in float64: 0 = exact, 1 = disjoint; ``attention_max_weight`` /
  ``exact_max_weight``: the mean over queries of the largest weight (1 = all attention on one key);
- ``normaliser_min``: the smallest ``sum_{j<=i} c(i-j) phi(q_i).phi(k_j)`` over positions (float32, as the op
  computes it), and ``tiny_normalisers``: the fraction of positions where it is below 1e-30;
- ``grad_phi_q_max`` / ``grad_phi_k_max``: the largest ``|dL/dphi|`` (``inf``/``nan`` when not finite);
- per parameter: gradient norm; ``nonfinite_params``: the parameters whose gradient is not finite, and then
  ``first_nonfinite_backward``: the backward function that made the first NaN, with its forward line.

Softmax layers are not instrumented (they have no features); their parameters' gradients are still reported.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from lm.model.attention import KernelizedAttention
from lm.ops.rpe_matrix import causal_rpe_bias
from lm.training.steplog import read_steps

TINY = 1e-30


def first_bad_step(run_dir: Path) -> tuple[int, str]:
    """(step, reason) of the first bad step in ``run_dir/steps.jsonl``; a ValueError when there is none."""
    for r in read_steps(Path(run_dir) / "steps.jsonl"):
        if r["bad"]:
            return r["step"], r["bad"]
    raise ValueError(f"{run_dir}/steps.jsonl has no bad step: nothing to probe (give --until STEP to probe it anyway)")


def _finite_max(t: torch.Tensor) -> float:
    """``max |t|``; ``nan`` if any element is nan, ``inf`` if any is infinite."""
    if torch.isnan(t).any():
        return math.nan
    return t.abs().max().item() if t.numel() else 0.0


class _Recorder:
    """Wraps the ``feature_map_qkv`` of one kernelized layer: keeps q, k (as the map sees them), the features
    (with their gradients retained), for :meth:`stats` after backward."""

    def __init__(self, layer: KernelizedAttention):
        self.layer = layer
        self.original = layer.feature_map_qkv
        self.saved: dict = {}
        layer.feature_map_qkv = self  # instance attribute: attend_heads' self.feature_map_qkv(q, k, v) calls this

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        phi_q, phi_k, v = self.original(q, k, v)
        with torch.no_grad():
            d = q.shape[-1]
            if self.layer.feature_map == "prf":  # the kernel exp(q.k / sqrt(d)) of q, k scaled by d ** -1/4
                qs, ks = q * d ** -0.25, k * d ** -0.25
                q_map, k_map = qs, ks
            else:  # nprf: the kernel exp(q^.k^) of the unit vectors; the norms reported are the raw ones
                qs, ks = q, k
                q_map, k_map = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            w = self.layer.projection.to(k_map.dtype)
            exponent = (k_map @ w.T - 0.5 * (k_map * k_map).sum(-1, keepdim=True)).amax(-1)
            self.saved.update(q_norm_max=qs.norm(dim=-1).max().item(), k_norm_max=ks.norm(dim=-1).max().item(),
                              key_exponent_max=exponent.max().item(), key_exponent_min=exponent.min().item(),
                              dead_keys=(phi_k.amax(-1) == 0).double().mean().item())
            self.saved["maps"] = (q_map.double(), k_map.double())
        phi_q.retain_grad()
        phi_k.retain_grad()
        self.saved["phi"] = (phi_q, phi_k)
        return phi_q, phi_k, v

    def stats(self, rpe_table: Optional[torch.Tensor]) -> dict:
        """The saved measurements plus the normaliser's, the attention's and the features' gradients."""
        phi_q, phi_k = self.saved["phi"]
        n = phi_q.shape[-2]
        pos = torch.arange(n, device=phi_q.device)
        b = (torch.zeros(phi_q.shape[1], 1, dtype=torch.float64, device=phi_q.device) if rpe_table is None
             else rpe_table.detach().double())
        b = b.expand(phi_q.shape[1], -1) if b.dim() == 1 else b
        log_c = causal_rpe_bias(b - b.amax(-1, keepdim=True), pos, pos)  # (H, N, N), -inf above the diagonal
        # the op's normaliser, in float32 as it sums it: sum_{j<=i} c(i-j) phi_q_i . phi_k_j
        scores = (phi_q.detach() @ phi_k.detach().transpose(-1, -2)) * log_c.exp().float()
        den = scores.sum(-1)
        rf = scores.double() / den.double().clamp_min(1e-300).unsqueeze(-1)  # random-feature attention weights
        q_map, k_map = self.saved["maps"]  # the exact kernel they estimate, in float64
        exact = torch.softmax(q_map @ k_map.transpose(-1, -2) + log_c, dim=-1)
        out = {k: v for k, v in self.saved.items() if k not in ("phi", "maps")}
        out.update(normaliser_min=den.min().item(), tiny_normalisers=(den < TINY).double().mean().item(),
                   attention_max_weight=rf.amax(-1).mean().item(), exact_max_weight=exact.amax(-1).mean().item(),
                   attention_error=0.5 * (rf - exact).abs().sum(-1).mean().item(),
                   grad_phi_q_max=_finite_max(phi_q.grad) if phi_q.grad is not None else None,
                   grad_phi_k_max=_finite_max(phi_k.grad) if phi_k.grad is not None else None)
        return out

    def remove(self) -> None:
        del self.layer.feature_map_qkv


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
    nonfinite = [n for n, g in grads.items() if not math.isfinite(g)]
    return {"loss": loss.item(), "grad_norm": total, "logit_max": logits.detach().abs().max().item(),
            "nonfinite_params": nonfinite, "param_grad_norms": grads, "layers": layers,
            "first_nonfinite_backward": first_nonfinite_backward(model, batch) if nonfinite else None}


def first_nonfinite_backward(model: torch.nn.Module, batch: torch.Tensor) -> str:
    """Which backward function first produced a NaN, and the forward line it belongs to, from a second forward +
    backward under ``torch.autograd.detect_anomaly`` (e.g. ``MulBackward0 at lm/ops/dense.py:22: a = (q @ ...``)."""
    import re
    import warnings

    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught, torch.autograd.detect_anomaly(check_nan=True):
        warnings.simplefilter("always")
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        try:
            loss.backward()
        except RuntimeError as e:
            function = re.search(r"Function '(\w+)'", str(e))
            where = ""
            for w in caught:  # the forward traceback of the failing function, innermost frame last
                frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)', str(w.message))
                frames = [f for f in frames if "/lm/" in f[0]]
                if frames:
                    path, line, code = frames[-1]
                    where = f" at {path[path.rindex('/lm/') + 1:]}:{line}: {code.strip()}"
            return f"{function.group(1) if function else str(e).splitlines()[0]}{where}"
        finally:
            model.zero_grad(set_to_none=True)
    return "none under anomaly detection (the non-finite values appeared outside autograd)"


def probe_run(run_dir: Path, work_dir: Path, snapshots: int = 6, overrides=(), until: Optional[int] = None) -> dict:
    """Retrain ``run_dir``'s config into ``work_dir`` up to the step before its first bad step ``F`` (about
    ``snapshots`` checkpoints on the way), then :func:`measure` each checkpoint ``s`` on the batch of step ``s + 1``.
    Returns ``{"run", "first_bad_step", "reason", "steps": [{"step": s + 1, ...measure...}]}``: the entry of step
    ``F`` is measured at the weights that produced the bad step. ``until``: probe up to that step instead (e.g. a
    stable run, for comparison; then ``first_bad_step`` is ``until`` and ``reason`` is "until")."""
    from lm.checkpoint import list_checkpoints
    from lm.inference.loading import load_for_inference
    from lm.config import load_stored_config
    from lm.data import global_batch, prepare_corpus
    from lm.training.loop import train

    run_dir, work_dir = Path(run_dir), Path(work_dir)
    bad_step, reason = (until, "until") if until else first_bad_step(run_dir)
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
    head = (f"{'step':>5} {'layer':>5} {'loss':>7} {'grad norm':>9} {'|logit|':>7} {'|q| max':>7} {'|k| max':>7} "
            f"{'key exp':>13} {'dead keys':>9} {'normaliser':>10} {'attn err':>8} {'max weight':>11} "
            f"{'|dL/dphi_k|':>11}  non-finite gradients")
    lines = [f"run {result['run']}: first bad step {result['first_bad_step']} ({result['reason']}); each line: the "
             f"weights after step - 1 on the batch of step; key exp = min..max over keys of the log of a key's "
             f"largest feature; normaliser = its smallest value; max weight = random features / exact kernel",
             head, "-" * len(head)]
    for s in result["steps"]:
        bad = ", ".join(s["nonfinite_params"][:3]) + (" ..." if len(s["nonfinite_params"]) > 3 else "")
        if s.get("first_nonfinite_backward"):
            lines.append(f"step {s['step']}: first NaN in backward: {s['first_nonfinite_backward']}")
        for L in s["layers"] or [{}]:
            nan = math.nan
            lines.append(
                f"{s['step']:>5} {L.get('layer', '-'):>5} {s['loss']:>7.3f} {s['grad_norm']:>9.3g} "
                f"{s['logit_max']:>7.1f} {L.get('q_norm_max', nan):>7.2f} {L.get('k_norm_max', nan):>7.2f} "
                f"{L.get('key_exponent_min', nan):>6.1f}..{L.get('key_exponent_max', nan):<5.1f} "
                f"{L.get('dead_keys', nan):>9.4f} {L.get('normaliser_min', nan):>10.2e} "
                f"{L.get('attention_error', nan):>8.3f} "
                f"{L.get('attention_max_weight', nan):>5.2f}/{L.get('exact_max_weight', nan):<5.2f} "
                f"{L.get('grad_phi_k_max', nan) or 0:>11.3g}  {bad or '-'}")
    return "\n".join(lines)
