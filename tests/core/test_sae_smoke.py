import torch

from diffbias_core import SparseAutoencoder


def test_sparse_decode_matches_dense_reference():
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, 4)
    x = torch.randn(3, 7, 16)
    code = sae.encode(x)
    dense = torch.zeros(3, 7, 64).scatter(-1, code.indices, code.values)
    reference = dense @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(sae.decode(code), reference)
    assert (code.values >= 0).all()
