#include "common/spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/err.h"

extern char **environ;

int spawn_run(const char *const *argv, char *out, size_t out_size)
{
        posix_spawn_file_actions_t fa;
        char tail[2048] = "";
        size_t tail_len = 0;
        int pipefd[2] = {-1, -1};
        pid_t pid;
        int status, r;

        if (pipe2(pipefd, O_CLOEXEC) < 0)
                return err_set(-errno, "failed to create a pipe: %s", strerror(errno));
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1);
        posix_spawn_file_actions_adddup2(&fa, pipefd[1], 2);
        r = posix_spawnp(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
        posix_spawn_file_actions_destroy(&fa);
        close(pipefd[1]);
        if (r != 0) {
                close(pipefd[0]);
                return err_set(-r, "failed to run '%s': %s", argv[0], strerror(r));
        }
        for (;;) {
                char buf[1024];

                _Static_assert(sizeof(buf) < sizeof(tail), "read buffer must fit the tail");
                ssize_t n = read(pipefd[0], buf, sizeof(buf));

                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                /* Keep the last part: the error is usually at the end. buf is smaller
                 * than tail, so dropping from the front always makes room. */
                if (tail_len + (size_t)n > sizeof(tail) - 1) {
                        size_t drop = tail_len + (size_t)n - (sizeof(tail) - 1);

                        memmove(tail, tail + drop, tail_len - drop);
                        tail_len -= drop;
                }
                memcpy(tail + tail_len, buf, (size_t)n);
                tail_len += (size_t)n;
        }
        close(pipefd[0]);
        tail[tail_len] = '\0';
        while (tail_len > 0 && (tail[tail_len - 1] == '\n' || tail[tail_len - 1] == ' '))
                tail[--tail_len] = '\0';
        if (out && out_size > 0)
                (void)snprintf(out, out_size, "%s", tail);
        while (waitpid(pid, &status, 0) < 0) {
                if (errno != EINTR)
                        return err_set(-errno, "failed to wait for '%s': %s", argv[0],
                                       strerror(errno));
        }
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
                return 0;
        if (WIFEXITED(status))
                return err_set(-EIO, "'%s' exited with status %d: %s", argv[0], WEXITSTATUS(status),
                               tail[0] ? tail : "(no output)");
        return err_set(-EIO, "'%s' was killed by signal %d", argv[0],
                       WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}
