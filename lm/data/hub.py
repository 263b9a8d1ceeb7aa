"""The Hugging Face hub as a source (``data.source=hf``): a quick reachability probe and an offline switch, so
that an unreachable hub fails within seconds (offline, `datasets` uses only its local cache; the evaluation
harness loads its task data through the same switch), and the dataset's rows joined back into the original
lines."""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from typing import Iterator
from urllib.parse import urlparse

from lm.config import DataConfig
from lm.data.source import DataError, SplitSource, row_chunks

PROBE_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds (DNS included)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts
    t.start()
    t.join(timeout)
    return bool(ok)


def offline_by_environment() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` asks for offline use."""
    return any(os.environ.get(name, "").upper() in ("1", "TRUE", "YES", "ON")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def hub_offline(offline: bool | None = None) -> Iterator[bool]:
    """Within the block, `datasets` and `huggingface_hub` use only local files and their local cache when
    ``offline`` is True, or, for None, when the environment asks for it (:func:`offline_by_environment`) or the
    hub cannot be reached (:func:`hub_reachable`). Yields whether they are offline. Both libraries read the
    offline flags from the environment at import time, so their module copies are switched (and restored
    afterwards)."""
    if offline is None:
        offline = offline_by_environment() or not hub_reachable()
    if not offline:
        yield False
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_hub_dataset(cfg: DataConfig):
    """``cfg.hf_name`` / ``cfg.hf_config`` as a `datasets` DatasetDict (from the local cache when offline)."""
    from datasets import load_dataset

    with hub_offline() as offline:
        try:
            return load_dataset(cfg.hf_name, cfg.hf_config)
        except Exception as e:  # datasets raises many types here (connection, not-cached, not-found)
            why = ("the Hugging Face hub cannot be reached and the dataset is not in the local `datasets` cache"
                   if offline else "loading from the Hugging Face hub failed")
            raise DataError(f"data.source=hf ({cfg.hf_name}/{cfg.hf_config}): {why} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}). Point the config at local files with "
                            f"data.path=DIR (wiki.{{train,valid,test}}.tokens or {{train,valid,test}}.txt) or use "
                            f"data.source=synthetic") from None


def hub_source(dataset_dict, cfg: DataConfig, split: str) -> SplitSource:
    """Split ``split`` of a loaded DatasetDict (``valid`` is also found as ``validation``)."""
    key = split if split in dataset_dict else {"valid": "validation"}.get(split, split)
    if key not in dataset_dict:
        raise DataError(f"{cfg.hf_name}/{cfg.hf_config} has no {split!r} split (it has {list(dataset_dict)})")
    ds = dataset_dict[key]

    def chunks() -> Iterator[str]:
        # wikitext rows are lines; blank lines come as "" without their newline, which is restored here
        rows = ([r if r.endswith("\n") else r + "\n" for r in b["text"]] for b in ds.iter(batch_size=10_000))
        return row_chunks(rows)

    h, n = hashlib.sha256(), 0
    for c in chunks():
        data = c.encode()
        h.update(data)
        n += len(data)
    if n == 0:
        raise DataError(f"{cfg.hf_name}/{cfg.hf_config} split {key!r} is empty")
    return SplitSource(split, h.hexdigest(), n, f"{cfg.hf_name}/{cfg.hf_config}:{key}", chunks)
