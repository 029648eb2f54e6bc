"""The example VMM at a size where it samples: runs, one restore request, a checksum that notices."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from .helpers import daemon_running, write_config
from .test_examples import finish, report_of, run_example


def test_a_sampled_guest_comes_back_and_a_damaged_page_is_noticed(shm_dir: Path) -> None:
    cfg = write_config(shm_dir, region={"size": "4G"})
    with daemon_running(shm_dir, config=cfg) as d:
        vmm = run_example("khoexamples.vmm", "--memory", "1G", "--verify", "sample", sock=d.socket)
        rv = report_of(vmm)
        assert rv["guest_bytes"] == 1 << 30 and rv["folios"] == 512
        with d.client() as op:
            op.finalize()
            op.handover()
        assert finish(vmm)[0] == 0
        assert d.wait() == 0

    with daemon_running(shm_dir, config=cfg) as d2:
        vmm = run_example("khoexamples.vmm", sock=d2.socket)  # stays for the next update
        rv = report_of(vmm)
        assert rv["mode"] == "resume" and rv["checksum_ok"] is True
        assert rv["folios"] == 512 and rv["bytes_copied"] == 0
        with d2.client() as op:
            st = {s["name"]: s for s in op.status()["sessions"]}
            assert st["vmm"]["preserved_bytes"] == 1 << 30  # preserved again
            op.finalize()
            op.handover()
        assert finish(vmm)[0] == 0
        assert d2.wait() == 0

    # a stamped page changes while no daemon runs: the next resume says so
    memfile = shm_dir / f"region.sessions/{os.getuid()}.vmm"
    fd = os.open(memfile, os.O_RDWR)
    try:
        first = os.lseek(fd, 0, os.SEEK_DATA)  # the first stamped page of the sparse file
        assert os.pread(fd, 16, first) != bytes(16)
        os.pwrite(fd, struct.pack("<Q", 0xBAD), first + 8)
    finally:
        os.close(fd)
    with daemon_running(shm_dir, config=cfg) as d3:
        vmm = run_example("khoexamples.vmm", "--once", sock=d3.socket)
        rv = report_of(vmm)
        rc, err = finish(vmm)
        assert rv["checksum_ok"] is False and rc == 1
        assert "DIFFERS" in err
        assert d3.stop() == 0
