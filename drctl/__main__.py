import sys

from drctl.cli import main
from drctl.lifecycle import die_with_parent_if_asked

die_with_parent_if_asked()
sys.exit(main())
