#!/usr/bin/env bash
# browser-setup.sh - what the browser tests (tests/real/test_browser.py) need, on Debian 12 as root:
#   * Debian's own chromium + chromium-driver (apt; headless, no sandbox: see the test's flags),
#   * the Python packages jupyterlab and playwright in the CURRENT python (python3 -m pip, or
#     $HPCK_PYTHON). Playwright only *drives* /usr/bin/chromium: we never run `playwright install`,
#     which would download a browser from outside the package registries.
# Idempotent: each step is skipped when its result is already there. .ci/run calls it as root.
set -euo pipefail
PY=${HPCK_PYTHON:-python3}
APT=(apt-get -o DPkg::Lock::Timeout=600 -q)
export DEBIAN_FRONTEND=noninteractive

if [[ ! -x /usr/bin/chromium ]] || ! command -v chromedriver >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "browser-setup: chromium is missing and we are not root: skipping apt" >&2
  else
    "${APT[@]}" update >/dev/null
    "${APT[@]}" install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
  fi
fi
[[ -x /usr/bin/chromium ]] && /usr/bin/chromium --version

if ! "$PY" -c 'import playwright, jupyterlab' >/dev/null 2>&1; then
  # The `browser` extra of pyproject.toml lists the same packages; kept explicit here so the
  # script works before the project itself is installed.
  "$PY" -m pip install -q --disable-pip-version-check 'jupyterlab>=4' 'playwright>=1.40'
fi
"$PY" -c 'import jupyterlab, playwright; print("jupyterlab", jupyterlab.__version__)'
