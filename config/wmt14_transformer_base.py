# Transformer base on WMT'14 En-De in the version of Luong et al. 2015 (50K vocabularies),
# as trained by the OpenNMT-py recipe the paper used: 6 + 6 layers, d 512, 8 heads, FFN 2048,
# dropout 0.1, label smoothing 0.1, Adam (0.9, 0.998), noam lr 2 with 8000 warm-up steps.
# --embed define: n = 128, k = 1024, m = 512, depth 3.
model = 'nmt'
dataset = 'wmt14_en_de'
src_lang, tgt_lang, corpus_variant = 'en', 'de', 'tok'
vocab_size = [50000, 50000]
max_vocab = 50000             # a multiple of 8: aligned output matmuls
embed = 'standard'
d_model, n_head, d_ff, enc_layers, dec_layers = 512, 8, 2048, 6, 6
n, k, m, depth = 128, 1024, 512, 3
dropout, dropatt, label_smoothing = 0.1, 0.1, 0.1
optimizer, beta1, beta2, weight_decay, grad_clip = 'adam', 0.9, 0.998, 0.0, 0.0
schedule, lr, warmup = 'noam', 2.0, 8000
max_tokens, batch_tokens, max_iters = 6250, 25000, 200000
eval_interval, log_interval = 5000, 100
beam, lenpen, max_len_b, bleu_tokenize = 4, 0.6, 50, '13a'
