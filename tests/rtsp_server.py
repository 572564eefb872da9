"""A real RTSP server for tests: GStreamer's gst-rtsp-server through Debian's python3-gi.

Run with the system Python (``/usr/bin/python3``, where ``gi`` lives), not the project's:

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --mount /cam0=media/clip.mp4 [--mount ...]

Each mount serves an H.264 MP4 file as a live RTSP stream paced at its frame rate (the file's
H.264 is sent as it is: ``filesrc ! qtdemux ! h264parse ! rtph264pay``); each client gets its
own pipeline from the file's start, and the stream ends with the file. Prints ``ready`` on
stdout once listening; ``SIGUSR1`` disconnects every client (a drop the server survives).
"""

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


class FileFactory(GstRtspServer.RTSPMediaFactory):
    """Serves one MP4 file; each client gets its own pipeline from the file's start."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.set_shared(False)

    def do_create_element(self, url):
        return Gst.parse_launch(
            f'filesrc location="{self.path}" ! qtdemux ! h264parse config-interval=-1 ! '
            f'rtph264pay name=pay0 pt=96 config-interval=1')


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mount", action="append", required=True, help="/PATH=FILE.mp4")
    args = parser.parse_args()
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    for spec in args.mount:
        path, _, file = spec.partition("=")
        mounts.add_factory(path, FileFactory(file))
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    def drop_clients():
        """SIGUSR1: disconnect every client (a network drop, without restarting the server)."""
        server.client_filter(lambda _server, _client: GstRtspServer.RTSPFilterResult.REMOVE)
        return True
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGUSR1, drop_clients)
    print("ready", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
