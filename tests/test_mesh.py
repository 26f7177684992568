"""lca.parallel.make_mesh: sizes, -1, and errors that name the axes."""

import pytest

from lca.parallel import make_mesh


def test_minus_one_takes_the_remaining_devices():
    mesh = make_mesh({"data": 2, "sequence": -1})
    assert dict(mesh.shape) == {"data": 2, "sequence": 4}


def test_product_must_equal_device_count():
    with pytest.raises(ValueError, match=r"multiply to 6.*8 devices"):
        make_mesh({"data": 2, "sequence": 3})


def test_minus_one_must_divide():
    with pytest.raises(ValueError, match="do not divide by 3"):
        make_mesh({"data": 3, "sequence": -1})
