"""Two real JAX processes on this machine (CPU, gloo collectives) run the README's SAMI smoke job
through ``launch/multihost.sh``: per-process shards, a global batch built from both processes' data,
shared checkpoints, one export."""

import os
import re
import socket
import subprocess
import sys

REPO = os.path.join(os.path.dirname(__file__), "..")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _diagnosis(output: str) -> str:
  """What a failed process said: its error lines (absl FATAL/ERROR, Python errors, aborts) and its last lines."""
  errors = [line for line in output.splitlines()
            if re.match(r"[EF]\d{4} ", line) or re.search(r"Error|Fatal|Terminating|Check failed|Aborted", line)]
  return "\n".join(["errors:", *errors[:40], "last lines:", *output.splitlines()[-30:]])


def test_two_process_sami_smoke_job(tmp_path):
  address = f"localhost:{_free_port()}"
  env = {**os.environ, "PYTHONPATH": os.path.abspath(REPO), "PATH": os.path.dirname(sys.executable) + ":" +
         os.environ.get("PATH", "")}
  env.pop("XLA_FLAGS", None)
  args = ["--config=configs/sami_vits.py:smoke", f"--workdir={tmp_path}", "--config.total_steps=6",
          "--config.log_every_steps=3", "--config.checkpoint.every_steps=3", "--alsologtostderr"]
  procs = [subprocess.Popen(["bash", "launch/multihost.sh", address, "2", str(i), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  codes = [p.returncode for p in procs]
  assert codes == [0, 0], "\n".join(f"process {i} (exit {code}):\n{_diagnosis(out)}"
                                     for i, (code, out) in enumerate(zip(codes, outputs)))
  for i, out in enumerate(outputs):
    assert f"process {i} of 2" in out
  assert "mesh {'data': 2, 'fsdp': 1}" in outputs[0] and "step 6/6" in outputs[0]
  # Each process wrote its own shard and manifest; process 0 alone exported the student.
  records = sorted(os.listdir(tmp_path / "teacher_records"))
  assert [n for n in records if n.startswith("manifest-")] == ["manifest-00000.json", "manifest-00001.json"]
  assert len([n for n in records if n.endswith(".tfrecord")]) == 2
  assert "6" in os.listdir(tmp_path / "checkpoints")
  assert os.path.isdir(tmp_path / "efficientsam_student") and "exported the student" not in outputs[1]


def test_process_sum_over_two_processes():
  address = f"localhost:{_free_port()}"
  script = ("import sys, jax; jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2])); "
            "from efficientsam_jax.common.multihost import process_sum; "
            "print('sum', process_sum(5 + 10 * int(sys.argv[2])))")
  env = {**os.environ, "PYTHONPATH": os.path.abspath(REPO)}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", script, address, str(i)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    assert "sum 20" in out.splitlines()[-1], out[-3000:]
