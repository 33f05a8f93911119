# The default Transformer-XL: a small model with DeFINE on WikiText-2 that trains to a test
# perplexity in a few minutes on one H100/H200 (see README for the number reached).
model = 'txl'
dataset = 'wikitext-2'
vocab_size = 33278
embed = 'define'
d_model, n_layer, n_head, d_head, d_inner = 256, 6, 8, 32, 1024
n, k, m, depth = 128, 1024, 256, 3
# DeFINE only: dropout on the map's output and between the unit's layers, as the authors' later
# code does; without it the unit overfits here (README: why DeFINE trails a projective table).
# map_dropout=0 unit_dropout=0 gives the setting of the earlier DeFINE rows
map_dropout, unit_dropout = 0.1, 0.1
dropout, dropatt = 0.3, 0.1
batch_size, bptt, mem_len = 32, 128, 128
optimizer, lr, weight_decay, grad_clip = 'adam', 5e-4, 0.0, 0.25
schedule, warmup, max_iters = 'cosine', 500, 8000
eval_interval, log_interval = 1000, 200
eval_batch_size, test_batch_size = 10, 10
