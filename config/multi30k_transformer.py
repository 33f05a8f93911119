# A small Transformer on Multi30k en->de (the official lowercased, tokenized files): trains
# in minutes on one GPU. --embed define uses the paper's NMT unit shape scaled to d 256.
model = 'nmt'
dataset = 'multi30k'
src_lang, tgt_lang, corpus_variant = 'en', 'de', 'tok'
vocab_size = [10214, 18726]   # specials + training types (en, de)
embed = 'standard'
d_model, n_head, d_ff, enc_layers, dec_layers = 256, 4, 1024, 3, 3
n, k, m, depth = 64, 512, 256, 3
dropout, dropatt, label_smoothing = 0.3, 0.1, 0.1
optimizer, beta1, beta2, weight_decay, grad_clip = 'adam', 0.9, 0.98, 0.0, 0.0
schedule, lr, warmup = 'noam', 0.5, 1000
max_tokens, max_iters = 4096, 3000
eval_interval, log_interval = 500, 100
beam, lenpen, max_len_b, bleu_tokenize = 4, 0.6, 50, 'none'
