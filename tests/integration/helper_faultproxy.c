#include "helper_faultproxy.h"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/util.h"

#define FAULTPROXY FIM_SOURCE_DIR "/tests/integration/faultproxy.py"

int faultproxy_start(struct faultproxy *fp, const char *endpoint, const char *log_path)
{
        const char *hostport = strstr(endpoint, "://");
        int in[2], out[2];
        char upstream[256], line[64];

        *fp = (struct faultproxy){.pid = -1};
        if (!hostport)
                return -1;
        (void)snprintf(upstream, sizeof(upstream), "%s", hostport + 3);
        upstream[strcspn(upstream, "/")] = '\0';
        (void)snprintf(fp->log_path, sizeof(fp->log_path), "%s", log_path);
        if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0)
                return -1;
        fp->pid = fork();
        if (fp->pid < 0)
                return -1;
        if (fp->pid == 0) {
                (void)dup2(in[0], STDIN_FILENO);
                (void)dup2(out[1], STDOUT_FILENO);
                execlp("python3", "python3", FAULTPROXY, "--upstream", upstream, "--log",
                       fp->log_path, (char *)NULL);
                _exit(127);
        }
        (void)close(in[0]);
        (void)close(out[1]);
        fp->in = fdopen(in[1], "w");
        fp->out = fdopen(out[0], "r");
        if (!fp->in || !fp->out || !fgets(line, sizeof(line), fp->out) ||
            sscanf(line, "port %d", &fp->port) != 1)
                return -1;
        (void)snprintf(fp->url, sizeof(fp->url), "http://127.0.0.1:%d", fp->port);
        return 0;
}

void faultproxy_query(struct faultproxy *fp, const char *cmd, char *ret, size_t size)
{
        fprintf(fp->in, "%s\n", cmd);
        fflush(fp->in);
        assert_non_null(fgets(ret, (int)size, fp->out));
        if (strncmp(ret, "ok", 2) != 0)
                fail_msg("faultproxy refused '%s': %s", cmd, ret);
}

void faultproxy_command(struct faultproxy *fp, const char *cmd)
{
        char answer[128];

        faultproxy_query(fp, cmd, answer, sizeof(answer));
        if (strcmp(answer, "ok\n") != 0)
                fail_msg("faultproxy answered '%s' to '%s'", answer, cmd);
}

int faultproxy_log_count(const struct faultproxy *fp, ...)
{
        char line[2048];
        FILE *f = fopen(fp->log_path, "re");
        int n = 0;

        assert_non_null(f);
        while (fgets(line, sizeof(line), f)) {
                va_list ap;
                const char *s;
                int all = 1;

                va_start(ap, fp);
                while ((s = va_arg(ap, const char *)) != NULL)
                        all = all && strstr(line, s) != NULL;
                va_end(ap);
                n += all;
        }
        fclose(f);
        return n;
}

void faultproxy_stop(struct faultproxy *fp)
{
        int status;

        if (fp->in)
                fclose(fp->in); /* end of input stops it */
        if (fp->out)
                fclose(fp->out);
        fp->in = fp->out = NULL;
        if (fp->pid <= 0)
                return;
        for (int i = 0; i < 50 && waitpid(fp->pid, &status, WNOHANG) == 0; i++)
                util_sleep_ms(100);
        if (waitpid(fp->pid, &status, WNOHANG) == 0) {
                (void)kill(fp->pid, SIGKILL);
                (void)waitpid(fp->pid, &status, 0);
        }
        fp->pid = -1;
}
