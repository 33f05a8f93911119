# A Transformer-XL with DeFINE that a laptop finishes: PTB, 3 layers of width 128, 1,500 steps
# (about 10 minutes on two CPU cores; the README gives the time and perplexity measured).
model = 'txl'
dataset = 'ptb'
vocab_size = 10000
embed = 'define'
d_model, n_layer, n_head, d_head, d_inner = 128, 3, 4, 32, 512
n, k, m, depth = 64, 256, 128, 3
dropout, dropatt = 0.3, 0.1
batch_size, bptt, mem_len = 16, 64, 64
optimizer, lr, weight_decay, grad_clip = 'adam', 1e-3, 0.0, 0.25
schedule, warmup, max_iters = 'cosine', 100, 1500
eval_interval, log_interval = 750, 100
eval_batch_size, test_batch_size = 10, 10
