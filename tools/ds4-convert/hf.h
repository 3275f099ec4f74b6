/* The non-tensor parts of a Hugging Face DeepSeek V4 checkpoint directory:
 * config.json -> ds4_hparams, tokenizer.json -> tokenizer.ggml.* keys. */
#ifndef DS4_CONVERT_HF_H
#define DS4_CONVERT_HF_H
#include <stddef.h>

#include "gguf/gguf.h"
#include "model/model.h"

/* Read DIR/config.json (DeepSeek's own keys, as in the published
 * config.json) and validate the result. -1 with err naming the key.
 * bos/eos: bos_token_id / eos_token_id, default 0 / 1 (spec §1.1). */
int hf_read_config(const char *path, ds4_hparams *hp, uint32_t *bos, uint32_t *eos, char *err, size_t errlen);

/* Read a tokenizer.json (model.vocab, model.merges, added_tokens) and add the
 * tokenizer.ggml.* keys for a vocabulary of n_vocab ids. Ids the file does not
 * name become control tokens "<｜place▁holder▁no▁ID｜>" (spec §12); an id at
 * or beyond n_vocab, a duplicate id or a malformed entry is an error. */
int hf_write_tokenizer(const char *path, uint32_t n_vocab, uint32_t bos, uint32_t eos, gguf_writer *w,
                       char *err, size_t errlen);

#endif
