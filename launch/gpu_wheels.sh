#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that launch/benchmark_gpu.sh needs on a machine whose image
# has jax, flax, optax, orbax-checkpoint, numpy, scikit-image and torch but not the rest of requirements.txt,
# and no package index (the lent GPU machines: CPython 3.12, x86_64). Versions: requirements.txt's pins, and
# the grain dependencies such an image lacks at the versions CI resolves today.
#
#   bash launch/gpu_wheels.sh [PYTHON_VERSION]      # then: bash launch/benchmark_gpu.sh OUT .whl "PARTS"
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
pin() { grep -i "^$1==" requirements.txt; }
packages=("$(pin grain)" "$(pin ml-collections)" "$(pin google-crc32c)" "$(pin pycocotools)" "$(pin tensorboardX)"
          array-record==0.8.6 portpicker==1.6.0)
platforms=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 \
    manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  "${platforms[@]}" -d .whl "${packages[@]}"
ls .whl
du -sh .whl
