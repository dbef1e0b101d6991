/*
 * LD_PRELOAD shim for tests/bench/worker_bench.sh: counts the PostgreSQL round trips a
 * process makes (every PQexec and PQexecParams is one request and one reply) and writes
 * "<count>" to $FIM_BENCH_PQCOUNT_FILE when the process exits normally.
 *
 *   cc -shared -fPIC -o pqcount.so kafka_bench_pqcount.c -ldl
 */
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include <libpq-fe.h>

static atomic_long pqcount_calls;

PGresult *PQexec(PGconn *conn, const char *query)
{
        static PGresult *(*real)(PGconn *, const char *);

        if (!real)
                *(void **)&real = dlsym(RTLD_NEXT, "PQexec");
        atomic_fetch_add(&pqcount_calls, 1);
        return real(conn, query);
}

PGresult *PQexecParams(PGconn *conn, const char *command, int nParams, const Oid *paramTypes,
                       const char *const *paramValues, const int *paramLengths,
                       const int *paramFormats, int resultFormat)
{
        static PGresult *(*real)(PGconn *, const char *, int, const Oid *, const char *const *,
                                 const int *, const int *, int);

        if (!real)
                *(void **)&real = dlsym(RTLD_NEXT, "PQexecParams");
        atomic_fetch_add(&pqcount_calls, 1);
        return real(conn, command, nParams, paramTypes, paramValues, paramLengths, paramFormats,
                    resultFormat);
}

__attribute__((destructor)) static void pqcount_dump(void)
{
        const char *path = getenv("FIM_BENCH_PQCOUNT_FILE");
        FILE *f;

        if (!path)
                return;
        f = fopen(path, "we");
        if (!f)
                return;
        fprintf(f, "%ld\n", atomic_load(&pqcount_calls));
        fclose(f);
}
