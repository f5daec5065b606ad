"""Follow one scan offline (as the reader process does) and print what was read, the error and peak memory."""
import sys
from pathlib import Path
from pipeline.config import FollowSettings
from pipeline.live.follow import ScanError, ScanFollower
read = []
try:
    with ScanFollower(Path(sys.argv[1]), FollowSettings(settle_s=0.0)) as follower:
        print("decodes_itself" , end=" ")
        for frame in follower.frames():
            if not read: print(follower._reader.decodes_itself)
            read.append(frame.index)
except ScanError as error:
    print("ERROR", error)
print("READ", read, "PEAK_MB", int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) // 1024)
