"""`python -m medclipsam`: the command line (`medclipsam.cli`)."""
import sys

from medclipsam.cli import main

if __name__ == "__main__":
    sys.exit(main())
