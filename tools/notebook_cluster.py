"""The cells of notebooks/09_from_notebook_to_cluster.ipynb (written by tools/make_notebooks.py)."""

CLUSTER = [
    (
        "md",
        """# 07 · From notebook to cluster: a job started elsewhere, watched here

**The fact.** On a cluster the ranks are started by the cluster's engine
(`torchrun`, `accelerate launch`, Slurm's `srun`), not by the notebook. It is
still one run: every rank writes its events to one run folder on shared
storage, `ddlkit.follow(folder)` turns that folder into a live `Run` (the same
dashboard, the same `set_lr` / `pause` / `stop`), and the result equals the
same experiment launched from the notebook, to float32 rounding.

Here two `torchrun` agents stand for two nodes (`--nnodes 2`, one rank each),
started exactly as from two terminals:

```bash
torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT \\
         --rdzv-id nb07 -m ddlkit.worker exp.yaml     # on each node
```""",
    ),
    (
        "code",
        """import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ddlkit

work = Path(tempfile.mkdtemp())
cfg = ddlkit.RunConfig(strategy="data", world_size=2, model="mlp", dataset="digits", steps=60, batch_size=16,
                       lr=0.05, device="cpu", run_dir=str(work / "runs"), delay_s={0: 0.05})
cfg.save(work / "exp.yaml")
with socket.socket() as s:                 # a free port for the rendezvous
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=nb07",
            "-m", "ddlkit.worker", str(work / "exp.yaml")]
nodes = [subprocess.Popen(torchrun, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
         for _node in range(2)]
folder = work / "runs" / "nb07"          # --rdzv-id names the run folder
while not folder.exists():
    time.sleep(0.1)""",
    ),
    (
        "md",
        """Follow the folder: a live, read-only `Run`. The dashboard draws as the
ranks write (`delay_s` slows rank 0 to 50 ms a step so there is something to
watch), and the kernel stays free.""",
    ),
    (
        "code",
        """run = ddlkit.follow(folder)
ddlkit.Dashboard(run)""",
    ),
    (
        "code",
        """run.wait(timeout=300)
exit_codes = [node.wait(timeout=60) for node in nodes]
print(run.status, "| ranks:", sorted(run.metrics["rank"].unique()), "| torchrun exit codes:", exit_codes)
assert run.status == "done" and exit_codes == [0, 0]""",
    ),
    (
        "md",
        """**The same run?** Launch the same config from the notebook (one machine,
ddlkit's own launcher, no delay) and compare the final weights.""",
    ),
    (
        "code",
        """here = ddlkit.launch(cfg.replace(delay_s=None), echo=False).wait(300)
gap = max((run.result().state_dict[k] - here.result().state_dict[k]).abs().max().item()
          for k in here.result().state_dict)
print(f"largest weight difference, two torchrun nodes vs. the notebook's launch: {gap:.1e}")
assert gap < 1e-5""",
    ),
]
