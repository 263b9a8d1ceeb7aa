"""The Hugging Face hub as a source (``data.source=hf``): a quick reachability probe and an offline switch, so
that an unreachable hub fails within seconds (offline, `datasets` uses only its local cache; the evaluation
harness loads its task data through the same switch); a folder written by `datasets`' ``save_to_disk`` in the
hub's place; which of the dataset's splits are ours; and, for a dataset of lines (WikiText), its rows joined back
into the original text. A dataset of documents is read by :mod:`lm.data.hub_documents`."""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from pathlib import Path
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


def hub_label(cfg: DataConfig) -> str:
    """``name/config`` of the hub dataset (for messages and cache origins)."""
    return cfg.hf_name if cfg.hf_config is None else f"{cfg.hf_name}/{cfg.hf_config}"


def load_hub_dataset(cfg: DataConfig):
    """``cfg.hf_name`` / ``cfg.hf_config`` as a `datasets` DatasetDict (from the local cache when offline)."""
    from datasets import load_dataset

    with hub_offline() as offline:
        try:
            return load_dataset(cfg.hf_name, cfg.hf_config)
        except Exception as e:  # datasets raises many types here (connection, not-cached, not-found)
            why = ("the Hugging Face hub cannot be reached and the dataset is not in the local `datasets` cache"
                   if offline else "loading from the Hugging Face hub failed")
            raise DataError(f"data.source=hf ({hub_label(cfg)}): {why} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}). Point the config at local files with "
                            f"data.path=DIR (wiki.{{train,valid,test}}.tokens or {{train,valid,test}}.txt) or "
                            f"data.files.train=GLOB, or use data.source=synthetic") from None


SAVED_MARKERS = ("dataset_dict.json", "state.json")
"""What `datasets`' save_to_disk writes at the top of a DatasetDict's / a Dataset's folder."""


def load_dataset_dict(cfg: DataConfig):
    """The dataset ``cfg.hf_name`` names: a folder written by ``save_to_disk`` (a single Dataset becomes the
    train split), else the hub's (:func:`load_hub_dataset`)."""
    folder = Path(cfg.hf_name).expanduser()
    if not any((folder / marker).is_file() for marker in SAVED_MARKERS):
        return load_hub_dataset(cfg)
    from datasets import Dataset, load_from_disk

    try:
        loaded = load_from_disk(str(folder))
    except Exception as e:  # datasets raises several types for a damaged folder
        raise DataError(f"data.hf_name={cfg.hf_name}: `datasets` could not load the saved dataset "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return {"train": loaded} if isinstance(loaded, Dataset) else loaded


def hub_rows(cfg: DataConfig) -> str:
    """What a row of ``cfg``'s hub dataset is: ``lines`` or ``documents`` (``data.hf_rows``; auto = lines for
    wikitext only)."""
    if cfg.hf_rows != "auto":
        return cfg.hf_rows
    return "lines" if Path(cfg.hf_name.rstrip("/")).name.lower() == "wikitext" else "documents"


_DEFAULT_NAMES = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}


def hub_split_key(dataset_dict, cfg: DataConfig, split: str) -> str | None:
    """The dataset's split that is our ``split``: ``data.hf_splits.<split>``, else the usual names; None when the
    dataset has no such split (it may then be carved out of train)."""
    given = getattr(cfg.hf_splits, split)
    if given is not None:
        if given not in dataset_dict:
            raise DataError(f"data.hf_splits.{split}={given}: {hub_label(cfg)} has no such split (it has "
                            f"{list(dataset_dict)})")
        return given
    found = next((k for k in _DEFAULT_NAMES[split] if k in dataset_dict), None)
    if found is None and split == "train":
        raise DataError(f"{hub_label(cfg)} has no 'train' split (it has {list(dataset_dict)}): name it with "
                        f"data.hf_splits.train")
    return found


def hub_source(dataset_dict, cfg: DataConfig, split: str) -> SplitSource:
    """Split ``split`` of a loaded DatasetDict of lines (``valid`` is also found as ``validation``)."""
    key = hub_split_key(dataset_dict, cfg, split)
    if key is None:
        raise DataError(f"{hub_label(cfg)} has no {split!r} split (it has {list(dataset_dict)}): name it with "
                        f"data.hf_splits.{split}, or read the rows as documents (data.hf_rows=documents), whose "
                        f"missing splits are carved out of train")
    ds = dataset_dict[key]
    if cfg.text_field not in ds.column_names:
        raise DataError(f"{hub_label(cfg)}:{key} has no column {cfg.text_field!r} (it has {ds.column_names}): set "
                        f"data.text_field to the column that holds the text")

    def chunks() -> Iterator[str]:
        # wikitext rows are lines; blank lines come as "" without their newline, which is restored here
        rows = ([r if r.endswith("\n") else r + "\n" for r in b[cfg.text_field]]
                for b in ds.iter(batch_size=10_000))
        return row_chunks(rows)

    h, n = hashlib.sha256(), 0
    for c in chunks():
        data = c.encode()
        h.update(data)
        n += len(data)
    if n == 0:
        raise DataError(f"{hub_label(cfg)} split {key!r} is empty")
    return SplitSource(split, h.hexdigest(), n, f"{hub_label(cfg)}:{key}", chunks)
