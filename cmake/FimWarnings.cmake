# The project's warning set (see STYLE R18), errors in CI, sanitizers on request.
set(FIM_WARNING_FLAGS
  -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wmissing-prototypes -Wstrict-prototypes
  -Wformat=2 -Wundef -Wwrite-strings -Wvla -Wno-format-zero-length)

if(FIM_SANITIZE STREQUAL "thread")
  # TSan cannot be combined with ASan; the libraries we link are not instrumented, so it sees
  # races in our code and at our calls into them, not inside them.
  add_compile_options(-fsanitize=thread -fno-omit-frame-pointer)
  add_link_options(-fsanitize=thread)
elseif(FIM_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-sanitize-recover=all
                      -fno-omit-frame-pointer)
  add_link_options(-fsanitize=address,undefined)
endif()

function(fim_enable_warnings target)
  target_compile_options(${target} PRIVATE ${FIM_WARNING_FLAGS})
  if(FIM_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()
