"""CheXbert-F1 and RadGraph-F1, when the site has the packages and their weights locally.

Neither is a dependency of the node: each needs a third-party package and a model that
those packages would download from the Hugging Face Hub. Here nothing is downloaded:

- the site passes the folder that holds the weights (``--chexbert DIR``, ``--radgraph DIR``);
- the metric runs in a child process (``python -m models.evaluation.optional``) with the
  Hub's offline switches set (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``) and
  network connections refused inside it, so a package that tries to download fails and
  the metric is reported as skipped with the package's error, instead of fetching;
- the report texts go to the child through a private temporary folder (mode 0700,
  files 0600), removed afterwards; the child's output is not shown.

CheXbert-F1 (``pip install f1chexbert``)
    ``DIR/chexbert.pth`` (f1chexbert's checkpoint), and the ``bert-base-uncased``
    tokenizer and config in the Hugging Face cache (``HF_HOME``). The value is the micro
    F1 over CheXpert's 14 observations of f1chexbert's ``rrg`` labels (uncertain counts
    as positive), the generated reports against the references.
RadGraph-F1 (``pip install radgraph``)
    ``DIR/<model_type>/`` as the radgraph package unpacks it (``config.json``,
    ``vocabulary/``, ``weights.th``; model type ``radgraph`` by default), and the BERT
    model that its ``config.json`` names in the Hugging Face cache. The value is
    F1RadGraph's mean reward at the ``partial`` level (entities and relations).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.evaluation.common import Skipped

__all__ = ["chexbert_f1", "radgraph_f1"]

_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
_NO_NETWORK = "network access refused by cxr-node evaluate (nothing is downloaded)"


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def chexbert_f1(
    hyps: Sequence[str],
    refs: Sequence[str],
    weights_dir: Path | None,
    *,
    device: str = "cpu",
    timeout_s: float = 7200.0,
) -> float | Skipped:
    """CheXbert micro F1 (14 observations), or :class:`Skipped` with the reason."""
    hint = "pip install f1chexbert, and pass --chexbert DIR (the folder holding chexbert.pth)"
    if weights_dir is None:
        return Skipped(f"no CheXbert weights given: {hint}")
    if not _installed("f1chexbert"):
        return Skipped(f"the f1chexbert package is not installed: {hint}")
    if not (Path(weights_dir) / "chexbert.pth").is_file():
        return Skipped(f"{Path(weights_dir).name}/chexbert.pth does not exist: {hint}")
    request = {"metric": "chexbert", "dir": str(weights_dir), "device": device}
    return _run(request, hyps, refs, timeout_s)


def radgraph_f1(
    hyps: Sequence[str],
    refs: Sequence[str],
    model_dir: Path | None,
    *,
    model_type: str = "radgraph",
    reward_level: str = "partial",
    device: str = "cpu",
    timeout_s: float = 7200.0,
) -> float | Skipped:
    """RadGraph F1 (``reward_level`` mean reward), or :class:`Skipped` with the reason."""
    hint = f"pip install radgraph, and pass --radgraph DIR (DIR/{model_type}/ unpacked)"
    if model_dir is None:
        return Skipped(f"no RadGraph model given: {hint}")
    if not _installed("radgraph"):
        return Skipped(f"the radgraph package is not installed: {hint}")
    folder = Path(model_dir) / model_type
    if not folder.is_dir() or not (folder / "weights.th").is_file():
        return Skipped(f"{Path(model_dir).name}/{model_type}/weights.th does not exist: {hint}")
    request = {
        "metric": "radgraph",
        "dir": str(model_dir),
        "device": device,
        "model_type": model_type,
        "reward_level": reward_level,
    }
    return _run(request, hyps, refs, timeout_s)


def _run(
    request: dict[str, Any], hyps: Sequence[str], refs: Sequence[str], timeout_s: float
) -> float | Skipped:
    """Run the metric in a child process without network; its value or why not."""
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"need paired texts, got {len(hyps)} and {len(refs)}")
    folder = Path(tempfile.mkdtemp(prefix="cxr-eval-"))  # mode 0700
    try:
        req_path, out_path = folder / "request.json", folder / "result.json"
        fd = os.open(req_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({**request, "hyps": list(hyps), "refs": list(refs)}, fh)
        env = {**os.environ, **_OFFLINE_ENV}
        try:
            subprocess.run(
                [sys.executable, "-m", "models.evaluation.optional", str(req_path), str(out_path)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return Skipped(f"{request['metric']} did not finish within {timeout_s:.0f} s")
        if not out_path.is_file():
            return Skipped(f"{request['metric']} worker ended without a result")
        result = json.loads(out_path.read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if "value" in result:
        return float(result["value"])
    return Skipped(f"{request['metric']} failed offline: {result.get('error', 'unknown error')}")


# -- the child process ------------------------------------------------------------------------


def _refuse_network() -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(_NO_NETWORK)

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse
    socket.getaddrinfo = refuse


def _chexbert(req: dict[str, Any]) -> float:
    import f1chexbert.f1chexbert as module

    module.CACHE_DIR = req["dir"]  # where f1chexbert 0.0.x looks for chexbert.pth
    scorer = module.F1CheXbert(device=req["device"])
    _accuracy, _per_example, report, _report5 = scorer(hyps=req["hyps"], refs=req["refs"])
    return float(report["micro avg"]["f1-score"])


def _radgraph(req: dict[str, Any]) -> float:
    from radgraph import F1RadGraph

    scorer = F1RadGraph(
        reward_level=req["reward_level"],
        model_type=req["model_type"],
        model_cache_dir=req["dir"],
        cuda=0 if str(req["device"]).startswith("cuda") else -1,
    )
    mean_reward = scorer(refs=req["refs"], hyps=req["hyps"])[0]
    return float(mean_reward)


def _child(request_path: str, result_path: str) -> int:
    _refuse_network()
    os.environ.update(_OFFLINE_ENV)
    with open(request_path, encoding="utf-8") as fh:
        req = json.load(fh)
    try:
        value = _chexbert(req) if req["metric"] == "chexbert" else _radgraph(req)
        result: dict[str, Any] = {"value": value}
    except Exception as exc:  # any failure of the third-party code: reported, not raised
        result = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":  # pragma: no cover - the child process of _run
    raise SystemExit(_child(sys.argv[1], sys.argv[2]))
