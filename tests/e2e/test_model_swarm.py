"""A swarm, not a queue: 8 computers in the test's own network namespaces, each link
capped so the network is the limit; one has the model, 7 pull it at once, and they are done in a
small multiple of one transfer's time, measured in the same run."""

import pytest

from support.model_swarm import can_make_namespaces, measure


@pytest.mark.skipif(can_make_namespaces() is not None, reason=str(can_make_namespaces()))
def test_seven_computers_pulling_at_once_take_at_most_three_times_one_transfer(tmp_path):
    result = measure(tmp_path, pullers=7, size=16 * 1024 * 1024, rate_mbit=40)

    assert all(last == {"status": "success"} for last in result["lasts"]), result["lasts"]
    print("one transfer %.1f s (%.1f MB/s); 7 at once %.1f s (%.1f MB/s in all)" % (
        result["single_s"], result["single_mb_s"], result["swarm_s"], result["swarm_mb_s"]))
    assert result["swarm_s"] <= 3 * result["single_s"], result
