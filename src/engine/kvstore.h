/* KV checkpoint file format, version 2 (private to kvstore.c and its tests;
 * docs/kv-cache.md explains it and the policies).
 *
 * A checkpoint file is DIR/<64 hex digits of SHA-256(text)>.kv:
 *
 *   header, KV_HEADER_BYTES, integers little-endian:
 *     [  0,   8) magic "DS4KVCP\0"
 *     [  8,  12) u32 version = KV_VERSION
 *     [ 12,  16) u32 header bytes = KV_HEADER_BYTES
 *     [ 16,  48) SHA-256 of the model id string given to ds4_kvstore_open
 *     [ 48,  80) SHA-256 of the text (the key; also the file name)
 *     [ 80, 112) SHA-256 of the token ids as i32 little-endian
 *     [112, 144) u64 text_len, n_ids, session_len, extra_len
 *     [144, 152) u64 created, unix seconds
 *     [152, 184) SHA-256 of the body
 *     [184, 200) the first 16 bytes of SHA-256 of the extra blob, so the
 *                extras of every checkpoint can be read and trusted at
 *                startup without reading (gigabytes of) session state
 *     [200, 232) SHA-256 of header bytes [0, 200)
 *     [232, 256) mutable metadata: u64 last_hit, u64 hits, then the first 8
 *                bytes of SHA-256(key ‖ last_hit ‖ hits). Rewritten in place
 *                on a hit; a torn or stale block only resets these counters.
 *   body: i32 ids[n_ids] ‖ text ‖ session blob ‖ extra blob
 *
 * Files are written as DIR/.<key hex>.<pid>.<seq>.tmp, fsynced, renamed into
 * place, and the directory fsynced. */
#ifndef DS4_KVSTORE_H
#define DS4_KVSTORE_H

#define KV_MAGIC "DS4KVCP"
#define KV_VERSION 2u
#define KV_HEADER_BYTES 256u

#define KV_OFF_VERSION 8u
#define KV_OFF_MODEL 16u
#define KV_OFF_KEY 48u
#define KV_OFF_TOKHASH 80u
#define KV_OFF_LENS 112u
#define KV_OFF_CREATED 144u
#define KV_OFF_BODYSUM 152u
#define KV_OFF_EXTRASUM 184u
#define KV_OFF_HDRSUM 200u
#define KV_OFF_META 232u

#endif
