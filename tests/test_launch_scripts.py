"""launch/benchmark_gpu.sh runs only where a GPU is lent, for a few minutes: every command it holds must at
least be accepted by the program it calls, so that no device time is lost to a stale flag."""
# pylint: disable=protected-access

import glob
import os
import re
import shlex

import jaxlib
import pytest

from efficientsam_jax import benchmark as inference_benchmark
from efficientsam_jax.inference import everything_benchmark
from efficientsam_jax.train import benchmark as train_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "benchmark_gpu.sh")
PARSERS = {"efficientsam_jax.train.benchmark": train_benchmark._parse_args,
           "efficientsam_jax.benchmark": inference_benchmark._parse_args,
           "efficientsam_jax.inference.everything_benchmark": everything_benchmark._parse_args}


def _script():
  """(the default parts, {part: [argv of each command it runs]})."""
  text = open(SCRIPT).read().replace("\\\n", " ")
  default = re.search(r"parts=\$\{3:-([^}]*)\}", text).group(1).split()
  body = text[text.index("case $part in"):text.index("esac")]
  commands: dict = {}
  for name, command in re.findall(r"\brun (\w+) \d+ (.+?)(?: ;;)?$", body, re.M):
    command = command.replace("$bench", "python3 -m efficientsam_jax.train.benchmark").replace("$out", "/tmp/out")
    commands.setdefault(name, []).append(shlex.split(command))
  return default, commands


def test_every_default_part_has_commands():
  default, commands = _script()
  assert default == list(commands), "the default PARTS and the script's case arms differ"
  assert "sami_kernels" in commands and "sami_profile" in commands


@pytest.mark.parametrize("part", _script()[1])
def test_every_command_is_accepted(part):
  for argv in _script()[1][part]:
    if argv[0] == "ncu":  # under Nsight Compute: the program it profiles
      argv = argv[argv.index("python3"):]
    assert argv[:2] == ["python3", "-m"], argv
    module, arguments = argv[2], argv[3:]
    if module == "efficientsam_jax.main":  # absl flags: the config file must exist
      config = next(a for a in arguments if a.startswith("--config=")).split("=", 1)[1].split(":")[0]
      assert os.path.exists(os.path.join(ROOT, config)), config
      continue
    PARSERS[module](arguments)  # argparse exits (a failure here) on an unknown or malformed flag


def test_every_xla_flag_is_one_xla_knows():
  """The XLA_FLAGS the script sets are options this jaxlib's XLA defines (it aborts on unknown ones); the GPU
  options are compiled into the CPU build's library too."""
  flags = set(re.findall(r"--(xla_\w+)=", open(SCRIPT).read()))
  assert "xla_gpu_enable_cublaslt" in flags
  unknown = flags | {"xla_gpu_no_such_option"}
  for path in glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "*.so")):
    data = open(path, "rb").read()
    unknown = {flag for flag in unknown if flag.encode() not in data}
  assert unknown == {"xla_gpu_no_such_option"}
