# Transformer-XL base on WikiText-103 as published (Dai et al. 2019): 16 layers, d 410,
# 10 heads of 41, d_inner 2100, adaptive softmax tied to a full-width table.
model = 'txl'
dataset = 'wikitext-103'
vocab_size = 267735
embed = 'standard'
cutoffs, factor = [20000, 40000, 200000], 1
d_model, n_layer, n_head, d_head, d_inner = 410, 16, 10, 41, 2100
dropout, dropatt = 0.1, 0.0
batch_size, bptt, mem_len = 60, 150, 150
optimizer, lr, weight_decay, grad_clip = 'adam', 2.5e-4, 0.0, 0.25
schedule, warmup, max_iters, min_lr = 'cosine', 0, 200000, 0.0
eval_tgt_len, eval_mem_len, eval_clamp_len, eval_same_length = 64, 640, 400, True
eval_interval, log_interval = 4000, 200
eval_batch_size, test_batch_size = 10, 10
