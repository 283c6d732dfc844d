import numpy as np
import pytest

from busgen_lib.data.devices import DEVICES, device_names, get_device


def test_registry_has_18_devices_from_9_manufacturers_with_two_each():
    assert len(DEVICES) == 18
    manufacturers = [d.manufacturer for d in DEVICES]
    assert len(set(manufacturers)) == 9
    assert all(manufacturers.count(m) == 2 for m in set(manufacturers))


def test_device_names_are_unique_and_round_trip():
    names = device_names()
    assert len(set(names)) == len(names) == 18
    assert all(get_device(name).name == name for name in names)


def test_unknown_device_error_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown device 'Vendor-Z X1'") as err:
        get_device("Vendor-Z X1")
    assert all(name in str(err.value) for name in device_names())


def test_psf_is_finer_at_higher_frequency():
    mhz = np.array([d.center_mhz for d in DEVICES])
    lateral = np.array([d.psf_lateral_px for d in DEVICES])
    axial = np.array([d.psf_axial_px for d in DEVICES])
    assert np.corrcoef(mhz, lateral)[0, 1] < -0.7
    assert np.corrcoef(mhz, axial)[0, 1] < -0.5
    assert (axial < lateral).mean() > 0.8   # lateral resolution is the worse one


def test_overlay_is_a_manufacturer_style_and_physics_differs_within_a_manufacturer():
    by_maker: dict[str, list] = {}
    for d in DEVICES:
        by_maker.setdefault(d.manufacturer, []).append(d)
    for a, b in by_maker.values():
        assert a.overlay == b.overlay
        assert (a.center_mhz, a.dynamic_range_db, a.tgc_db) != (b.center_mhz, b.dynamic_range_db, b.tgc_db)
    assert len({d.overlay for d in DEVICES}) == 9
