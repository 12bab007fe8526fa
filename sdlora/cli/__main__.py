"""`python -m sdlora.cli …` is the `sdlora` command."""
import sys

from . import main

sys.exit(main())
