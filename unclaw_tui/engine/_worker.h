/*
 * _worker.h: the data plane on a thread of its own.
 *
 * Without it, every batch of packets goes through the owner's event loop: a wake-up, a callback
 * and the interpreter lock, which a busy console thread holds just when the packets come.  The
 * worker is a plain C thread that waits on the UDP socket, the splices' epoll fd and the
 * engine's deadline, and does what the loop did for them (wg_io_recv, wg_splice_service,
 * wg_tick).  It never needs the interpreter: the owner hears from it only when the engine has
 * something only the owner can handle (wg_owner_work: handshake messages, new connections, data
 * for the owner's own flows), through an eventfd.  Reports of connections the engine opened and
 * ended on its own (wg_reports_waiting) wake the owner in batches, at most 20 ms late.
 *
 * One mutex guards the engine.  The worker holds it while it works and drops it while it waits;
 * the owner takes it (wg_worker_lock) around every use of the engine while the worker runs, and
 * the worker steps aside for a waiting owner between batches.  wg_worker_unlock wakes the worker
 * when the owner moved the engine's deadline earlier, and raises the notification again when
 * work for the owner is still waiting.
 */
#ifndef UNCLAW_WORKER_H
#define UNCLAW_WORKER_H

#include "_wgstack.h"

typedef struct wg_worker wg_worker;

/* Start the thread over e, whose UDP socket is attached (wg_io_attach).  notify_fd is the
 * owner's eventfd; the worker adds 1 to it when owner work appears.  NULL on failure. */
wg_worker *wg_worker_start(wg_engine *e, int notify_fd);

/* Stop and join the thread, then free w.  The engine is the owner's alone again. */
void wg_worker_stop(wg_worker *w);

/* Take and give back the engine (see above).  Not recursive. */
void wg_worker_lock(wg_worker *w);
void wg_worker_unlock(wg_worker *w);

/* Times the worker woke, and batches it ran (for tests and benchmarks). */
typedef struct {
    uint64_t wakeups;
    uint64_t notifications;
} wg_worker_stats;
void wg_worker_get_stats(wg_worker *w, wg_worker_stats *out);

#endif
