"""Video ClusterFit on R(2+1)D, every stage: the design's main job.

    python jobs/clusterfit_video.py --data <videos> --target <labelled videos> [--config f.yaml] [key=value ...]
    python jobs/clusterfit_video.py --demo       # generated motion-class MP4s, a few minutes on 2 CPU cores
    ray job submit --working-dir . -- python jobs/clusterfit_video.py --config video_fight.yaml ...

Under `ray job submit` it joins that cluster (ray.init() without arguments); otherwise it starts a local Ray.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cf_ray.environment import require_environment  # noqa: E402  (standard library only)

require_environment("jobs/clusterfit_video.py")

from cf_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="clusterfit_video.py", stage="all", video=True))
