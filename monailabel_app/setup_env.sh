#!/usr/bin/env bash
# Create the MONAI Label environment .venv-label next to the repository's own .venv: monailabel needs numpy<2
# (numpymaxflow), which highdicom's pyjpegls and pandas 3.1 in the main environment refuse, so the app gets its own.
# Usage: bash monailabel_app/setup_env.sh [ENV_DIR]   (default: <repo>/.venv-label; safe to re-run)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
env_dir="${1:-$root/.venv-label}"
python="${PYTHON:-python3}"
export PIP_PROGRESS_BAR=off PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$env_dir/bin/python" ]; then
  "$python" -m venv "$env_dir"
fi
echo '*' > "$env_dir/.gitignore"  # the environment is never committed
"$env_dir/bin/python" -m pip install --quiet --upgrade pip
"$env_dir/bin/python" -m pip install --quiet -e "$root[label]"
# monailabel imports pydicom-seg at start, which needs pydicom<3; highdicom (medclipsam's DICOM SEG writer, which the
# app does not use) needs pydicom>=3, so pip reports that conflict here: write DICOM SEG from the main environment.
"$env_dir/bin/python" -m pip install --quiet "pydicom>=2.4.4,<3" dicomweb-client pynetdicom
"$env_dir/bin/python" -c "import monailabel, medclipsam, numpy; print('monailabel', monailabel.__version__, \
  '| numpy', numpy.__version__)"
echo "MONAI Label environment ready: $env_dir"
echo "start: . $env_dir/bin/activate && monailabel start_server --app $root/monailabel_app --studies FOLDER"
