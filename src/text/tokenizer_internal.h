/* Private to src/text: building a tokenizer with explicit special flags
 * (GGUF token_type 3/4, tokenizer.json added_tokens), and the tokenizer.json
 * loader used by tests and tools/ds4-tokbench. */
#ifndef DS4_TEXT_TOKENIZER_INTERNAL_H
#define DS4_TEXT_TOKENIZER_INTERNAL_H
#include "ds4.h"

/* As ds4_tokenizer_new, but special[i] != 0 marks token i as special/added
 * (matched by ds4_tokenize_special, decoded verbatim). */
ds4_tokenizer *tok_build(const char *const *tokens, const uint64_t *token_lens, uint32_t n_tokens,
                         const char *const *merges, const uint64_t *merge_lens, uint32_t n_merges,
                         const uint8_t *special, char *err, size_t errlen);

/* Loads an HF tokenizer.json (model.vocab, model.merges as "a b" strings or
 * [a, b] pairs, added_tokens). overlay (may be NULL) is a JSON file whose
 * "known_ids" object maps spellings to ids that replace whatever is there
 * (deepseek-v4-special-tokens.json). Ids below n_vocab that are still empty
 * get "<｜place▁holder▁no▁N｜>" with N = id - 128000, as V3 named its unused
 * ids. Specials follow the ds4_tokenizer_new rule. */
ds4_tokenizer *tok_load_hf_json(const char *path, const char *overlay, uint32_t n_vocab, char *err, size_t errlen);
#endif
