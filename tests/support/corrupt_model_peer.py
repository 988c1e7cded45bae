"""An insider that serves damaged model bytes: a real node (room code, own key) whose relay flips
a byte in every piece of a blob it sends. Run as ``python tests/support/corrupt_model_peer.py [node flags]``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import neuromesh  # noqa: E402

honest_pieces = neuromesh.ModelShare._pieces


def damaged_pieces(self, read, start, end):
    for piece in honest_pieces(self, read, start, end):
        yield bytes([piece[0] ^ 0xFF]) + piece[1:]


neuromesh.ModelShare._pieces = damaged_pieces

if __name__ == "__main__":
    sys.exit(neuromesh.main())
