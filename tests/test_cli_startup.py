"""`wadi-analyze` starts without what its command does not use: `--help` imports neither torch nor pandas."""

import subprocess
import sys

from typer.testing import CliRunner

from wadi_analysis.cli import app
from wadi_analysis.spectrum import DEFAULT_SPECTRUM_FRACTIONS


def test_help_imports_neither_torch_nor_pandas():
    code = ("import sys\nfrom wadi_analysis.cli import main\nsys.argv = ['wadi-analyze', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'pandas', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Compare diffusion checkpoints" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_names_load_on_first_use():
    code = ("import sys, wadi_analysis\nassert 'torch' not in sys.modules\n"
            "import wadi_analysis.compare\nfrom wadi_analysis import compare, open_checkpoint\n"
            "from wadi_analysis.compare import compare as function\n"
            "assert compare is function and callable(open_checkpoint) and 'summarize' in dir(wadi_analysis)\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_compare_help_states_the_default_spectrum_fractions():
    """The help text types the default out (importing it would load torch): it must stay the library's."""
    result = CliRunner().invoke(app, ["compare", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    assert "default " + " ".join(map(str, DEFAULT_SPECTRUM_FRACTIONS)) in " ".join(result.stdout.split())
