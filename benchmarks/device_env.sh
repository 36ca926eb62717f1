# Source this first on a GPU machine that has torch but not this project installed:
#   source benchmarks/device_env.sh
# Installs the carried wheels (hydra-core, omegaconf, antlr4; fetch them into .whl/ beforehand)
# and exposes the checkout as the `dsv3` namespace without pip-installing it.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
mkdir -p /tmp/ns/dsv3
for pkg in model fp8 parallel data train launch recipes; do ln -sfn "$PWD/$pkg" "/tmp/ns/dsv3/$pkg"; done
export PYTHONPATH=/tmp/site:/tmp/ns
