# Transformer-XL rows of Mehta et al. 2020 (WikiText-103): d_model 384, d_inner 1920, 16
# layers of 10 heads of 41; projective embedding (div_val 1) or DeFINE (depth 3, k 4096,
# m 384) on a map of width n: --embed projective|define --n 64|128|256|384.
model = 'txl'
dataset = 'wikitext-103'
vocab_size = 267735
embed = 'define'
n = 384
cutoffs, factor = [20000, 40000, 200000], 1
d_model, n_layer, n_head, d_head, d_inner = 384, 16, 10, 41, 1920
k, m, depth = 4096, 384, 3
dropout, dropatt = 0.1, 0.0
batch_size, bptt, mem_len = 60, 150, 150
optimizer, lr, weight_decay, grad_clip = 'adam', 2.5e-4, 0.0, 0.25
schedule, warmup, max_iters, min_lr = 'cosine', 0, 200000, 0.0
eval_tgt_len, eval_mem_len, eval_clamp_len, eval_same_length = 64, 640, 400, True
eval_interval, log_interval = 4000, 200
eval_batch_size, test_batch_size = 10, 10
