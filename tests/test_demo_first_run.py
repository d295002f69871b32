"""`make run`'s first run (harness.demo): with the asked profile not trained yet, the demo serves a quick tiny
model's lists at once from the real stack while the asked profile trains in a background process, and Ctrl-C
stops the services and that training. A fresh SPECREC_HOME holding only the data and the tiny artifacts stands
in for a machine that has trained the quick model but not the small one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from harness.stack import free_port

FIRST_LIST_S = 180  # the bound for a newcomer's first list


def test_first_run_serves_a_quick_model_while_the_asked_one_trains(tiny_artifacts, tmp_path):
    home = Path(os.environ["SPECREC_HOME"])
    shutil.copytree(home / "data", tmp_path / "data")
    # the tiny target only: the quick path needs no drafter
    shutil.copytree(tiny_artifacts.directory, tmp_path / "artifacts" / "ml-100k" / "tiny",
                    ignore=shutil.ignore_patterns("drafter*", "retrieval*"))
    env = {**os.environ, "SPECREC_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    ports = [str(free_port()) for _ in range(3)]
    t0 = time.monotonic()
    demo = subprocess.Popen([sys.executable, "-m", "harness.demo", "--profile", "small", "--users", "42", "--n", "3",
                             "--port", ports[0], "--draft-port", ports[1], "--target-port", ports[2]],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(demo.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        while time.monotonic() - t0 < FIRST_LIST_S and not any(line.startswith("   3. ") for line in lines):
            assert demo.poll() is None, "".join(lines[-30:])
            time.sleep(0.2)
        first_list_s = time.monotonic() - t0
        assert first_list_s < FIRST_LIST_S, "".join(lines)[-3000:]
        assert "specrec is up (tiny profile: a quick tiny target, plain decoding, until the small models are " \
               "trained)" in "".join(lines)
        started = None
        while started is None and time.monotonic() - t0 < FIRST_LIST_S + 30:  # the training starts after the lists
            started = re.search(r"Training the small profile in the background \(pid (\d+)", "".join(lines))
            time.sleep(0.2)
        assert started, "".join(lines)[-3000:]
        trainer = int(started.group(1))
        assert psutil.pid_exists(trainer)  # the small profile is training meanwhile
        demo.send_signal(signal.SIGINT)
        assert demo.wait(90) == 0, "".join(lines[-30:])
        assert not psutil.pid_exists(trainer) or psutil.Process(trainer).status() == psutil.STATUS_ZOMBIE
        assert "stopping..." in "".join(lines)
        print(f"\nfirst list after {first_list_s:.1f} s (data and the tiny model already there)")
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(30)
