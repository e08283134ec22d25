import sys

from fairseq_kd.cli import main

sys.exit(main())
