/*
 * _worker.c: the engine on a thread of its own (see _worker.h for the contract).  The worker
 * thread blocks in epoll_wait on the UDP socket, the splices' epoll fd and a wake eventfd, and
 * runs the engine under its mutex; wg_worker_lock / unlock run on the owner's thread.
 */
#define _GNU_SOURCE
#include "_worker.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* Datagrams per batch: the engine lock is held for one batch, so this bounds how long the
 * owner can wait for it (about 256 x 2 us). */
#define WORKER_RECV_BUDGET 256
/* Longest sleep without a deadline: the stop flag is also seen through the wake fd, so this
 * only bounds the damage of a lost wake-up. */
#define WORKER_MAX_SLEEP_MS 1000
/* How many times the worker yields to an owner waiting for the lock before taking it anyway. */
#define WORKER_YIELDS 64
/* Reports (connections the engine opened and ended on its own) are read in batches: the owner
 * is woken for them this long after the first one waits, or once this many wait, instead of
 * once per connection.  Their events come this much later; nothing else waits for them. */
#define REPORT_DELAY 0.02
#define REPORT_BATCH 256

enum { TAG_UDP = 1, TAG_SPLICE = 2, TAG_WAKE = 3 };

struct wg_worker {
    wg_engine *e;
    pthread_t thread;
    pthread_mutex_t lock;
    atomic_int owner_waiting; /* owners blocked in wg_worker_lock */
    int epfd, wake_fd, notify_fd;
    /* Under the lock: */
    bool stop;
    bool sleeping;      /* in epoll_wait, until sleep_until (0 = no deadline) */
    double sleep_until;
    bool notified;      /* notify_fd raised and the owner has not locked since */
    double reports_since; /* when the oldest unread report was seen (0 = none waits) */
    uint64_t wakeups, notifications;
};

static double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* the clock of Python's time.monotonic() */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void bump(int fd) {
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(fd, &one, sizeof one);
    } while (r < 0 && errno == EINTR);
    /* EAGAIN: the counter is saturated, so the reader will wake anyway. */
}

static void notify_owner(wg_worker *w, double now) {
    uint32_t reports = wg_reports_waiting(w->e);
    if (reports == 0) w->reports_since = 0;
    else if (w->reports_since == 0) w->reports_since = now;
    if (w->notified) return;
    bool reports_due =
        reports != 0 && (reports >= REPORT_BATCH || now >= w->reports_since + REPORT_DELAY);
    if (!reports_due && !wg_owner_work(w->e)) return;
    w->notified = true;
    w->notifications++;
    bump(w->notify_fd);
}

static int sleep_ms(double deadline, double now) {
    if (deadline == 0) return WORKER_MAX_SLEEP_MS;
    double ms = ceil((deadline - now) * 1000.0);
    if (ms <= 0) return 0;
    return ms > WORKER_MAX_SLEEP_MS ? WORKER_MAX_SLEEP_MS : (int)ms;
}

/* Called without the lock: let an owner that is waiting for the engine take it first.  Without
 * this the worker, always ready again at once under load, could take the lock back every time. */
static void step_aside(wg_worker *w) {
    for (int i = 0; i < WORKER_YIELDS && atomic_load(&w->owner_waiting) > 0; i++) sched_yield();
}

static void *worker_main(void *arg) {
    wg_worker *w = arg;
    wg_engine *e = w->e;
    struct epoll_event evs[8];
    pthread_mutex_lock(&w->lock);
    while (!w->stop) {
        double now = monotonic_now();
        double deadline = wg_next_deadline(e);
        if (w->reports_since != 0 && !w->notified) {
            double due = w->reports_since + REPORT_DELAY;
            if (deadline == 0 || due < deadline) deadline = due;
        }
        int timeout = sleep_ms(deadline, now);
        int n = 0;
        if (timeout > 0) {
            w->sleeping = true;
            w->sleep_until = deadline;
            pthread_mutex_unlock(&w->lock);
            n = epoll_wait(w->epfd, evs, 8, timeout);
            step_aside(w);
            pthread_mutex_lock(&w->lock);
            w->sleeping = false;
            if (w->stop) break;
            w->wakeups++;
        } else {
            n = epoll_wait(w->epfd, evs, 8, 0); /* a deadline is due: take the sockets' news too */
        }
        bool udp = false, splice = false;
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u32 == TAG_UDP) udp = true;
            else if (evs[i].data.u32 == TAG_SPLICE) splice = true;
            else {
                uint64_t count;
                while (read(w->wake_fd, &count, sizeof count) < 0 && errno == EINTR) {
                }
            }
        }
        now = monotonic_now();
        if (udp) wg_io_recv(e, now, WORKER_RECV_BUDGET); /* also takes the splices' news */
        else if (splice) wg_splice_service(e, now);
        wg_timers_due(e, now);
        notify_owner(w, now);
        if (udp || splice) {
            /* Between batches under load: let a waiting owner in before the next one. */
            if (atomic_load(&w->owner_waiting) > 0) {
                pthread_mutex_unlock(&w->lock);
                step_aside(w);
                pthread_mutex_lock(&w->lock);
            }
        }
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

static int watch(int epfd, int fd, uint32_t tag) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = tag};
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

wg_worker *wg_worker_start(wg_engine *e, int notify_fd) {
    if (!e || notify_fd < 0 || wg_io_fd(e) < 0) {
        errno = EINVAL;
        return NULL;
    }
    wg_worker *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->e = e;
    w->notify_fd = notify_fd;
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    w->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    splice_table *t = wg_engine_splice(e);
    if (w->epfd < 0 || w->wake_fd < 0 || watch(w->epfd, wg_io_fd(e), TAG_UDP) != 0 ||
        watch(w->epfd, w->wake_fd, TAG_WAKE) != 0 ||
        (t && watch(w->epfd, splice_fd(t), TAG_SPLICE) != 0)) {
        int err = errno;
        if (w->epfd >= 0) close(w->epfd);
        if (w->wake_fd >= 0) close(w->wake_fd);
        free(w);
        errno = err;
        return NULL;
    }
    pthread_mutex_init(&w->lock, NULL);
    atomic_init(&w->owner_waiting, 0);
    int err = pthread_create(&w->thread, NULL, worker_main, w);
    if (err != 0) {
        pthread_mutex_destroy(&w->lock);
        close(w->epfd);
        close(w->wake_fd);
        free(w);
        errno = err;
        return NULL;
    }
    return w;
}

void wg_worker_stop(wg_worker *w) {
    if (!w) return;
    pthread_mutex_lock(&w->lock);
    w->stop = true;
    pthread_mutex_unlock(&w->lock);
    bump(w->wake_fd);
    pthread_join(w->thread, NULL);
    pthread_mutex_destroy(&w->lock);
    close(w->epfd);
    close(w->wake_fd);
    free(w);
}

void wg_worker_lock(wg_worker *w) {
    atomic_fetch_add(&w->owner_waiting, 1);
    pthread_mutex_lock(&w->lock);
    atomic_fetch_sub(&w->owner_waiting, 1);
    /* The owner is about to look: what it leaves undone is raised again at unlock. */
    w->notified = false;
}

void wg_worker_unlock(wg_worker *w) {
    bool wake = false;
    if (w->sleeping) {
        double deadline = wg_next_deadline(w->e);
        wake = deadline != 0 && (w->sleep_until == 0 || deadline < w->sleep_until);
        if (wake) w->sleep_until = deadline; /* one wake-up per earlier deadline */
    }
    notify_owner(w, monotonic_now());
    pthread_mutex_unlock(&w->lock);
    if (wake) bump(w->wake_fd);
}

void wg_worker_get_stats(wg_worker *w, wg_worker_stats *out) {
    out->wakeups = w->wakeups;
    out->notifications = w->notifications;
}
