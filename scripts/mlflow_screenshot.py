"""A PNG of the MLflow UI comparing two runs: starts `mlflow ui` on 127.0.0.1, opens the compare page in
headless Chromium (Debian's `chromium` package), writes the screenshot, stops the server.

    python scripts/mlflow_screenshot.py --work-dir runs/demo [--run ID --run ID] --out runs/demo/compare.png

Default runs: the two latest evaluations of the `cllm` experiment. The PNG is not committed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow

from tasks.tracking import latest_evaluations

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=15000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--run", action="append", default=[], help="run id (twice); default: two latest evaluations")
    parser.add_argument("--out", type=Path, default=Path("runs/demo/mlflow-compare.png"))
    parser.add_argument("--size", default="1600,2400", help="window WIDTH,HEIGHT (tall: the metric table is below)")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("error: no chromium on PATH; install Debian's package: apt-get install chromium")
    store = f"sqlite:///{(args.work_dir / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(store)
    experiment = mlflow.get_experiment_by_name("cllm")
    if experiment is None:
        sys.exit(f"error: no `cllm` experiment in {store}; run the demo first")
    try:
        runs = args.run or [run.info.run_id for run in latest_evaluations()]
    except ValueError as error:
        sys.exit(f"error: {error} (--run ID --run ID)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(60):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(1)
        experiments = json.dumps([experiment.experiment_id])
        query = urllib.parse.urlencode({"runs": json.dumps(runs), "experiments": experiments})
        url = f"{base}/#/compare-runs?{query}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={args.size}",
                            f"--screenshot={args.out.resolve()}", url], check=True, capture_output=True, timeout=120)
        print(f"{args.out}: {url}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
