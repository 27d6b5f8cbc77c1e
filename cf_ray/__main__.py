import sys

from cf_ray.cli import main

sys.exit(main())
