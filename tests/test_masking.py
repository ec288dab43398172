import torch

from encoder_train.batch import IGNORE_INDEX
from encoder_train.data.masking import mask_tokens

BOS, PAD, EOS, UNK, MASK = range(5)
SPECIAL = torch.tensor([BOS, PAD, EOS, UNK, MASK])
V = 1000


def batch(n=256, t=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (n, t), generator=g)
    ids[:, 0], ids[:, -1] = BOS, EOS
    ids[: n // 2, t // 2 :] = PAD  # half the rows padded
    ids[: n // 2, t // 2 - 1] = EOS
    return ids


def run(ids, p=0.15, seed=0):
    return mask_tokens(ids, mask_probability=p, mask_id=MASK, special_ids=SPECIAL, vocab_size=V,
                       generator=torch.Generator().manual_seed(seed))


def test_share_selected_and_80_10_10_split():
    ids = batch()
    inputs, labels = run(ids)
    selectable = ~torch.isin(ids, SPECIAL)
    chosen = labels != IGNORE_INDEX
    share = chosen.sum() / selectable.sum()
    assert abs(share.item() - 0.15) < 0.005
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original ids
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01
    assert abs(kept - 0.1) < 0.01  # a random draw may equal the original: that counts as kept (p ~ 1/V)
    assert abs(replaced - 0.1) < 0.01
    assert torch.equal(inputs[~chosen], ids[~chosen])  # unselected tokens untouched


def test_special_tokens_never_selected_nor_drawn():
    ids = batch()
    inputs, labels = run(ids, p=0.9)
    assert (labels[torch.isin(ids, SPECIAL)] == IGNORE_INDEX).all()
    random_positions = (labels != IGNORE_INDEX) & (inputs != MASK) & (inputs != ids)
    assert random_positions.sum() > 0
    assert not torch.isin(inputs[random_positions], SPECIAL).any()
    assert (inputs[random_positions] < V).all()
    assert torch.equal(inputs == PAD, ids == PAD)


def test_deterministic_per_generator_and_fresh_otherwise():
    ids = batch(32, 64)
    a, b, c = run(ids, seed=1), run(ids, seed=1), run(ids, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
