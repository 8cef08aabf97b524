"""examples/train_slurm.sbatch under a time limit / pre-emption notice.

SLURM sends SIGTERM to the batch shell only (``--signal=B:TERM``). This test plays SLURM's part:
it runs the real batch script with stand-ins for ``scontrol``, ``srun`` (the command in a process
group of its own, as slurmstepd gives a step) and ``scancel`` (signals that group), and the real
torchrun launching a worker that, on SIGTERM, takes a while to "save". The save must finish
before the batch shell exits, although torchrun's default grace is set shorter than the save.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SAVE_SECONDS = 2.0

FAKES = {
    "scontrol": "#!/bin/sh\necho 127.0.0.1\n",
    # srun OPTIONS... COMMAND: the command in a session of its own, its id recorded for scancel
    "srun": "#!/bin/sh\nwhile [ \"${1#--}\" != \"$1\" ]; do shift; done\n"
            "setsid -w sh -c 'echo $$ > \"$FAKE_STEP_PGID\"; exec \"$@\"' sh \"$@\" &\nwait $!\n",
    # scancel --signal=SIG JOBID: every process of the job's steps, not the batch shell
    "scancel": "#!/bin/sh\nkill -s \"${1#--signal=}\" -- -\"$(cat \"$FAKE_STEP_PGID\")\"\n",
    # the real torchrun, one worker per node, running the stand-in instead of pretrain_mfm.py
    "torchrun": f"#!{sys.executable}\nimport os, sys\nfrom torch.distributed.run import main\n"
                "args = sys.argv[1:]\nargs[args.index('--nproc-per-node') + 1] = '1'\n"
                "args[args.index('pretrain_mfm.py')] = os.environ['FAKE_WORKER']\nmain(args)\n",
}

WORKER = f"""
import os, signal, time
from pathlib import Path
record = Path(os.environ["FAKE_RECORD"])
signals = []
signal.signal(signal.SIGTERM, lambda *_: signals.append(time.time()))
(record / "ready").write_text(str(os.getpid()))
while not signals:
    time.sleep(0.05)
time.sleep({SAVE_SECONDS})  # the checkpoint save
(record / "saved").write_text("saved")
"""


def test_sigterm_to_the_batch_shell_reaches_the_workers_and_waits_for_their_save(tmp_path):
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node1", "SLURM_SUBMIT_DIR": str(tmp_path),
           "MASTER_PORT": str(free_port()), "FAKE_STEP_PGID": str(tmp_path / "step.pgid"),
           "FAKE_WORKER": str(tmp_path / "worker.py"), "FAKE_RECORD": str(record),
           "MFM_SAVE_GRACE_S": "30",
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1"}  # torchrun's default grace made shorter than the save
    with open(tmp_path / "batch.log", "w") as log:
        batch = subprocess.Popen(["bash", str(ROOT / "examples" / "train_slurm.sbatch"), "run.yaml"], env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (record / "ready").exists():
            assert batch.poll() is None and time.time() < deadline, (tmp_path / "batch.log").read_text()[-3000:]
            time.sleep(0.1)
        batch.send_signal(signal.SIGTERM)  # SLURM's --signal=B:TERM@300
        batch.wait(timeout=60)
        assert (record / "saved").exists(), "the workers saved before the batch shell ended:\n" + \
            (tmp_path / "batch.log").read_text()[-3000:]
    finally:
        if batch.poll() is None:
            batch.kill()
        leave_no_stray_process(tmp_path / "step.pgid", record / "ready")


def leave_no_stray_process(step_group: Path, worker_pid: Path) -> None:
    """Kill what a failing run left: the step's process group and the worker (torchrun starts
    its workers in sessions of their own)."""
    for path, kill in ((step_group, os.killpg), (worker_pid, os.kill)):
        try:
            kill(int(path.read_text()), signal.SIGKILL)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            pass
