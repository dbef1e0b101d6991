/* `process-image`: download, unpack and activate one image in-process. */
#include <stdio.h>

#include "worker/cli.h"
#include "worker/commands.h"

int cmd_process_image(int argc, char **argv)
{
        (void)argc;
        fprintf(stderr, "%s: not yet available: the unpack and activate stages are not built yet\n",
                argv[0]);
        return CMD_EXIT_FAILURE;
}
