import sys

from cf_ray.environment import require_environment

require_environment("-m cf_ray")

from cf_ray.cli import main  # noqa: E402

sys.exit(main(prog="python -m cf_ray"))
