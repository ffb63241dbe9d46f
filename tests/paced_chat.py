"""`offload-chat` (the real `offload_engine.cli.main`, argv as given) whose every reply pauses in the middle of
a decode step, with experts acquired and in use, until a SIGINT arrives; it says "[paused]" on stderr first.

test_cli's Ctrl-C test runs this, so that its SIGINT lands while a reply is being generated on any machine
(a fast one used to finish a 400-token reply before the signal arrived)."""

from __future__ import annotations

import sys
import time

from offload_engine import cli
from offload_engine.expert_cache import ExpertCache
from offload_engine.model import OffloadedModel

PAUSE_AT_STEP = 8  # the forward pass of a reply that pauses (the prompt's prefill is the first)
PAUSED = "[paused]"
steps = 0  # forward passes of the current reply
_reply, _step, _use = cli.Chat.reply, OffloadedModel.step, ExpertCache.use


def counted_reply(self, message: str) -> bool:
    global steps
    steps = 0
    return _reply(self, message)


def counted_step(self, *args, **kwargs):  # every forward pass goes through step()
    global steps
    steps += 1
    return _step(self, *args, **kwargs)


def pausing_use(self, layer: int, expert: int):
    buffer = _use(self, layer, expert)
    if steps == PAUSE_AT_STEP and layer == self.num_layers - 1:
        print(PAUSED, file=sys.stderr, flush=True)
        time.sleep(600)  # a SIGINT raises KeyboardInterrupt here
    return buffer


if __name__ == "__main__":  # only here: importing this module (for its constants) changes nothing
    cli.Chat.reply, OffloadedModel.step, ExpertCache.use = counted_reply, counted_step, pausing_use
    sys.exit(cli.main(sys.argv[1:]))
