import sys, time
from pathlib import Path
from pipeline.config import FollowSettings
from pipeline.live.follow import ScanFollower
with ScanFollower(Path(sys.argv[1]), FollowSettings(settle_s=0.0)) as f:
    f.open(); t = time.monotonic(); f.read_frame(0); print("one frame read in %.1f s (no progress message in between)" % (time.monotonic() - t))
