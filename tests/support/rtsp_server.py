"""A real RTSP server for tests: GStreamer's gst-rtsp-server through Debian's python3-gi.

Run with the system Python (``/usr/bin/python3``, where ``gi`` lives), not the project's:

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --mount /cam0=media/clip.mp4 [--mount ...]
    /usr/bin/python3 tests/rtsp_server.py --port 8554 --record /pub=out-{n}.ts [--record ...]

Each ``--mount`` serves an H.264 MP4 file as a live RTSP stream paced at its frame rate (the
file's H.264 is sent as it is: ``filesrc ! qtdemux ! h264parse ! rtph264pay``); each client gets
its own pipeline from the file's start, and the stream ends with the file.

Each ``--record`` accepts a publisher (RTSP ANNOUNCE/RECORD, e.g. FFmpeg's rtsp muxer) sending
H.264 and writes what it receives to a file: ``.ts`` as MPEG-TS (readable even when cut off,
e.g. when this server is killed), ``.mkv`` as Matroska. ``{n}`` in the file name is replaced by
the publisher session's number (0, 1, ...), so a publisher that reconnects starts a new file;
without it each session overwrites the file. When a publisher disconnects (TEARDOWN or a
dropped connection) the pipeline gets an end-of-stream first, so the file is finalized.

Prints ``ready`` on stdout once listening; ``SIGUSR1`` disconnects every client (a drop the
server survives); each finished recording prints ``recorded FILE`` on stdout.
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


class RecordFactory(GstRtspServer.RTSPMediaFactory):
    """Takes H.264 from a publisher and writes it to a file (MPEG-TS for .ts, Matroska otherwise)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern
        self.sessions = 0
        self.last_path = ""
        self.set_shared(False)
        self.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
        self.set_eos_shutdown(True)  # EOS before teardown: the muxer finalizes the file
        self.set_latency(100)

    def do_create_element(self, url):
        path = self.pattern.replace("{n}", str(self.sessions))
        self.sessions += 1
        mux = "mpegtsmux" if path.endswith(".ts") else "matroskamux"
        self.last_path = path
        return Gst.parse_launch(
            f'( rtph264depay name=depay0 ! h264parse ! {mux} ! '
            f'filesink location="{path}" )')

    def do_configure(self, media):
        """Called right after do_create_element() for the same media."""
        path = self.last_path
        media.connect("unprepared", lambda _media: print(f"recorded {path}", flush=True))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mount", action="append", default=[], help="/PATH=FILE.mp4: serve the file")
    parser.add_argument("--record", action="append", default=[],
                        help="/PATH=OUT.ts (or .mkv): record what a publisher sends; {n} = session number")
    args = parser.parse_args()
    if not args.mount and not args.record:
        parser.error("give at least one --mount or --record")
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    for spec in args.mount:
        path, _, file = spec.partition("=")
        mounts.add_factory(path, FileFactory(file))
    for spec in args.record:
        path, _, file = spec.partition("=")
        mounts.add_factory(path, RecordFactory(file))
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
