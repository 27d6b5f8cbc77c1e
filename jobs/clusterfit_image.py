"""Image ClusterFit, every stage: `python jobs/clusterfit_image.py --data <images> --target <labelled images>`.

Under `ray job submit --working-dir . -- python jobs/clusterfit_image.py ...` it joins that cluster;
otherwise it starts a local Ray. `--demo` generates the embedded demo dataset and runs on it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cf_ray.environment import require_environment  # noqa: E402  (standard library only)

require_environment("jobs/clusterfit_image.py")

from cf_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="clusterfit_image.py", stage="all"))
