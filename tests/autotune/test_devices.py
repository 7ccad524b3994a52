

def test_h200_is_told_apart_from_h100_by_name_and_memory():
    from autotune.devices import match_nvidia

    gib = 1 << 30
    assert match_nvidia("NVIDIA H200", 90, 132, 141 * gib).name == "h200"
    assert match_nvidia("NVIDIA H100 80GB HBM3", 90, 132, 80 * gib).name == "h100"
    # A renamed board: the memory decides.
    assert match_nvidia("GH100 board", 90, 132, 140 * gib).name == "h200"
    h200 = match_nvidia("NVIDIA H200", 90, 132, 141 * gib)
    assert h200.mem_bandwidth == 4.8e12 and h200.fingerprint() != match_nvidia("NVIDIA H100", 90, 132, 80 * gib).fingerprint()
